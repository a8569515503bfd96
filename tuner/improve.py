"""The self-improvement job: collect -> grade -> dataset -> tune -> gate -> promote -> reload.

    selftune improve calculator --cycles 1

One cycle per iteration. Each step's outcome is written to the job's `state.json` as soon as
it is done, so a job that crashed resumes from the step it was in (`--resume`, the default
when the last job did not finish). A file lock keeps two jobs from overlapping; `--every 6h`
keeps running on a schedule.

Why few-shot collection: the base model rarely calls tools zero-shot, but with worked examples
as prior turns it often does. Training on those traces with the examples removed (context
distillation, done by the SFT builder) teaches it to do zero-shot what it did with help.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from agent.config import Config
from traces.times import TimeParseError, parse_duration
from tuner.schemas import EvalSummary

STEPS = ("collect", "dataset", "tune", "gate", "reload")


class ImproveError(RuntimeError):
    """The job cannot go on; the message says what to do."""


@dataclass
class ImproveSettings:
    envs: list[str]
    cycles: int = 1
    method: str = "sft"
    budget_minutes: float | None = None
    collect_limit: int = 108  # train tasks per environment per cycle (6 of each calculator kind)
    collect_samples: int = 1
    collect_temperature: float = 0.0
    few_shot: int = 2  # demonstrations while collecting, if the active model is weak
    hints: bool = True  # a wave with the tasks' hints for tasks failed without them
    weak_below: float = 0.8  # "weak": zero-shot test success under this -> collect few-shot
    eval_limit: int = 54  # held-out test tasks per environment for the gate
    concurrency: int = 16  # episodes at once (per model in the gate); batches of up to 16
    max_train_steps: int = -1  # -1: epochs from [tuner]
    min_new_traces: int | None = None  # default [tuner] min_new_traces
    seed: int = 0
    # per model call: a tool call takes ~30 tokens and an answer ~10, while a rambling base model
    # fills whatever it gets, and a batch lasts as long as its longest row
    max_tokens: int = 64
    every_s: float | None = None


@dataclass
class CycleState:
    index: int
    started: float = field(default_factory=time.time)
    done: list[str] = field(default_factory=list)
    collect: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    candidate: str | None = None
    train_metrics: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> env -> summary
    skipped: str | None = None
    wall_s: float | None = None


@dataclass
class JobState:
    id: str
    settings: dict[str, Any]
    started: float = field(default_factory=time.time)
    finished: float | None = None
    cycles: list[CycleState] = field(default_factory=list)
    baseline: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> env -> summary

    @classmethod
    def load(cls, path: Path) -> JobState:
        data = json.loads(path.read_text())
        data["cycles"] = [CycleState(**c) for c in data.get("cycles", [])]
        return cls(**data)


def parse_every(text: str) -> float:
    """'6h' / '30m' / '1d' / '90s' / '2w' -> seconds."""
    try:
        return parse_duration(text)
    except TimeParseError as e:
        raise ImproveError(f"--every {e}") from None


@contextmanager
def job_lock(cfg: Config) -> Iterator[None]:
    """Hold `<workspace>/locks/improve.lock`; a second job fails at once, naming the first."""
    cfg.workspace.ensure()
    path = cfg.workspace.locks / "improve.lock"
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        raise ImproveError(
            f"another improve job holds {path} ({holder}): wait for it, or stop it first"
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} since {time.ctime()}")
    fh.flush()
    try:
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


class ImproveJob:
    """One improve job: its state file, its agent, and the loop over cycles."""

    def __init__(self, cfg: Config, settings: ImproveSettings, console: Console | None = None):
        self.cfg = cfg
        self.s = settings
        self.console = console or Console(stderr=True)
        self.jobs_dir = cfg.workspace.jobs
        self.state: JobState | None = None
        self.dir: Path | None = None
        self._agent = None

    # -- state ----------------------------------------------------------------------------------

    def _save(self) -> None:
        from tuner.registry import write_atomic

        assert self.state is not None and self.dir is not None
        write_atomic(self.dir / "state.json", json.dumps(asdict(self.state), indent=2, default=str))

    def _latest_unfinished(self) -> Path | None:
        if not self.jobs_dir.is_dir():
            return None
        for d in sorted(
            self.jobs_dir.glob("improve-*"), key=lambda p: p.stat().st_mtime, reverse=True
        ):
            f = d / "state.json"
            if f.is_file():
                try:
                    st = JobState.load(f)
                except (json.JSONDecodeError, TypeError, KeyError):
                    continue
                return d if st.finished is None else None
        return None

    def open(self, resume: bool | None = None) -> None:
        """Start a new job, or resume the last one if it did not finish (`resume=None`: auto)."""
        unfinished = self._latest_unfinished()
        if unfinished is not None and resume is not False:
            self.dir = unfinished
            self.state = JobState.load(unfinished / "state.json")
            cyc = self.state.cycles[-1] if self.state.cycles else None
            where = f"cycle {cyc.index}, after {cyc.done or 'nothing'}" if cyc else "the start"
            self.console.print(f"[yellow]resuming job {self.state.id} from {where}[/yellow]")
            return
        if resume:
            raise ImproveError("there is no unfinished improve job to resume")
        job_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.dir = self.jobs_dir / f"improve-{job_id}"
        self.dir.mkdir(parents=True)
        self.state = JobState(id=job_id, settings=asdict(self.s))
        self._save()

    # -- the pieces -----------------------------------------------------------------------------

    async def _agent_started(self):
        if self._agent is None:
            from agent.agent import Agent

            self._agent = Agent(self.cfg, checkpoints=False)
            await self._agent.start()
        return self._agent

    async def _evaluate(
        self, env: str, adapter: str | None, few_shot: int = 0, progress: bool = True
    ) -> dict[str, Any]:
        """Held-out test split, greedy, fixed seed: what every model in the job is judged on."""
        from agent.envs.run import run_suite

        agent = await self._agent_started()
        res = await run_suite(
            self.cfg,
            env,
            split="test",
            limit=self.s.eval_limit,
            concurrency=self.s.concurrency,
            adapter=adapter or "base",
            few_shot=few_shot,
            seed=self.s.seed,
            max_tokens=self.s.max_tokens,
            agent=agent,
            tags=[f"job:{self.state.id}", "eval"],
            progress=progress,
        )
        return _summary(res).model_dump()

    async def _baseline(self) -> None:
        """Base model zero-shot and few-shot on each environment, once per job (the learning
        curve's first two points)."""
        for label, k in (("base", 0), ("base few-shot", self.s.few_shot)):
            for env in self.s.envs:
                if env in self.state.baseline.get(label, {}):
                    continue
                self.console.print(f"[bold]baseline[/bold] {label} on {env}")
                self.state.baseline.setdefault(label, {})[env] = await self._evaluate(env, None, k)
                self._save()

    def _active(self) -> str | None:
        from tuner.registry import open_registry

        rec = open_registry(self.cfg).active()
        return rec.version if rec else None

    async def _collect(self, cyc: CycleState) -> None:
        """Play the train tasks. While the active model is weak, in up to three waves:
        1. with the environment's demonstrations (few-shot);
        2. the failed tasks again with their hints, where tasks have them (STaR's
           rationalization; the dataset puts the plain prompt back);
        3. the tasks still failed, with the most similar solved tasks as extra examples
           (bootstrapped few-shot: a solved task of the same kind shows which numbers go where).
        Measured on calculator with the base SmolLM2: a demonstration's operator is copied
        (0 of 132 sampled tries at temperature 1 found "+", "-" or "/" when both showed "*"),
        hints fix about half of those, and similar solved examples most of the rest."""
        from agent.envs import load_environment
        from agent.envs.run import run_suite

        if self.s.method == "grpo":
            return  # GRPO collects its own rollouts, from the policy it trains
        agent = await self._agent_started()
        active = self._active()
        for env in self.s.envs:
            known = self._latest_eval(env, active)
            weak = known is None or known["success_rate"] < self.s.weak_below
            few = self.s.few_shot if weak else 0
            waves: list[tuple[int, str | None]] = [(few, None)]
            if weak and self.s.hints:
                train = load_environment(env, config=self.cfg.agent).split("train")
                if any(t.hint for t in train[: self.s.collect_limit]):
                    waves.append((few, "hinted"))
            if weak and few:
                waves.append((few + 2, "similar"))
            solved: set[str] = set()
            attempted: set[str] = set()
            stats = {"n": 0, "successes": 0, "few_shot": few, "waves": []}
            for w, (k, which) in enumerate(waves):
                ids = None
                if which is not None:
                    ids = attempted - solved
                    if not ids or (which == "similar" and not solved):
                        break
                self.console.print(
                    f"[bold]collect[/bold] {env} wave {w + 1}"
                    f"{' (' + which + ')' if which else ''}: "
                    f"{len(ids) if ids is not None else self.s.collect_limit} train tasks, "
                    f"few-shot {k}, adapter {active or 'base'}"
                )
                res = await run_suite(
                    self.cfg,
                    env,
                    split="train",
                    limit=self.s.collect_limit,
                    task_ids=ids,
                    concurrency=self.s.concurrency,
                    adapter=active or "base",
                    few_shot=k,
                    samples=self.s.collect_samples,
                    temperature=self.s.collect_temperature if self.s.collect_samples > 1 else None,
                    seed=self.s.seed + 1000 * cyc.index + w,
                    max_tokens=self.s.max_tokens,
                    agent=agent,
                    tags=[f"job:{self.state.id}", f"cycle:{cyc.index}", "collect"],
                    progress=True,
                    hints=which == "hinted",
                )
                attempted |= {o.task_id for o in res.outcomes}
                solved |= {o.task_id for o in res.outcomes if o.success}
                stats["n"] += res.n
                stats["successes"] += res.successes
                stats["waves"].append(
                    {
                        "kind": which or "demos",
                        "few_shot": k,
                        "n": res.n,
                        "successes": res.successes,
                    }
                )
            stats["tasks_solved"] = len(solved)
            cyc.collect[env] = stats

    def _latest_eval(self, env: str, adapter: str | None) -> dict[str, Any] | None:
        label = adapter or "base"
        for cyc in reversed(self.state.cycles):
            if env in cyc.evals.get(label, {}):
                return cyc.evals[label][env]
        return self.state.baseline.get("base", {}).get(env) if adapter is None else None

    def _dataset(self, cyc: CycleState) -> None:
        from agent.envs import environment_tasks
        from agent.workspace import open_store
        from traces.datasets import DatasetError, DatasetFilters, build_dataset

        if self.s.method == "grpo":
            return  # no dataset: GRPO learns from its rollouts' grades
        store = open_store(self.cfg)
        new_passing = sum(c.get("tasks_solved", c["successes"]) for c in cyc.collect.values())
        need = self.s.min_new_traces or self.cfg.tuner.min_new_traces
        if new_passing < need:
            cyc.skipped = (
                f"only {new_passing} new passing traces this cycle (need {need}, [tuner] "
                "min_new_traces): collect more tasks (--collect-limit) or lower the threshold"
            )
            return
        tasks: dict = {}
        for env in self.s.envs:
            tasks.update(environment_tasks(env, self.cfg)[1])
        out = self.dir / f"cycle{cyc.index}-{self.s.method}"
        filters = DatasetFilters(
            min_score=1.0, best_of_n=self.s.method == "sft", since=cyc.started, exclude_flagged=True
        )
        try:
            res = build_dataset(
                store,
                self.s.method,
                out,
                filters,
                tasks=tasks,
                scrub_patterns=self.cfg.traces.scrub_patterns,
            )
        except DatasetError as e:
            cyc.skipped = f"no dataset: {e}"
            return
        cyc.dataset = {"dir": str(out), "rows": res.rows, "manifest": str(out / "manifest.json")}

    async def _tune_grpo(self, cyc: CycleState) -> None:
        """Online RL from the active adapter; a killed run resumes at its last step."""
        from tuner.grpo import GrpoError, GrpoRun
        from tuner.schemas import GrpoConfig

        if len(self.s.envs) != 1:
            raise ImproveError("--method grpo trains on one environment: give exactly one")
        gc = GrpoConfig(
            steps=self.s.max_train_steps if self.s.max_train_steps > 0 else 8,
            max_tokens=self.s.max_tokens,
            concurrency=self.s.concurrency,
            seed=self.s.seed,
            rollout_engine=self.cfg.tuner.grpo_rollout_engine,
        )
        # a run on its own vLLM server makes its own agent, pointed at that server
        agent = await self._agent_started() if gc.rollout_engine == "agent" else None
        try:
            run = GrpoRun(self.cfg, self.s.envs[0], gc, resume=True, console=self.console)
        except GrpoError:  # nothing to resume: a new run from the active adapter
            run = GrpoRun(
                self.cfg, self.s.envs[0], gc, start_from=self._active(), console=self.console
            )
        rec = await run.run(agent=agent)
        cyc.candidate = rec.version
        cyc.train_metrics = {"grpo_run": run.state.id, "steps": run.state.step}

    def _tune(self, cyc: CycleState):
        if self.s.method == "grpo":
            return self._tune_grpo(cyc)
        from agent.model.files import model_dir
        from tuner.registry import open_registry
        from tuner.schemas import TrainConfig
        from tuner.train import TrainError, train_in_subprocess

        registry = open_registry(self.cfg)
        active = registry.active()
        overrides: dict[str, Any] = {"seed": self.s.seed}
        if self.s.max_train_steps > 0:
            overrides["max_steps"] = self.s.max_train_steps
        tc = TrainConfig.from_section(self.cfg.tuner, **overrides)
        out = self.dir / f"cycle{cyc.index}-adapter"
        try:
            result = train_in_subprocess(
                self.s.method,
                cyc.dataset["dir"],
                base_model_dir=model_dir(self.cfg),
                out_dir=out,
                parent_adapter_dir=registry.path(active.version) if active else None,
                config=tc,
                resume="auto",  # a killed tune step goes on from its last checkpoint
                progress=True,
            )
        except TrainError as e:
            raise ImproveError(
                f"cycle {cyc.index}: training failed: {e} (`selftune improve` resumes from the "
                "tune step and its last checkpoint)"
            ) from None
        rec = registry.register(
            result.adapter_dir,
            base_model=self.cfg.model.name,
            parent=active.version if active else None,
            dataset_manifest=cyc.dataset["manifest"],
            train_config=result.config.model_dump(),
            metrics=result.metrics,
            notes=[f"improve job {self.state.id}, cycle {cyc.index}"],
        )
        cyc.candidate = rec.version
        cyc.train_metrics = result.metrics

    async def _gate(self, cyc: CycleState) -> None:
        """Active and candidate on the same held-out tasks, same seed and sampling, in one run."""
        from tuner.gate import decide, gate_table, guards_from
        from tuner.registry import open_registry

        registry = open_registry(self.cfg)
        active = self._active()
        sums: dict[str, list[EvalSummary]] = {"active": [], "candidate": []}
        for env in self.s.envs:
            # both at once: their requests share batches (peft mixed-adapter rows)
            self.console.print(
                f"[bold]gate[/bold] candidate {cyc.candidate} and active {active or 'base'} "
                f"on {env}"
            )
            cand, act = await asyncio.gather(
                self._evaluate(env, cyc.candidate), self._evaluate(env, active, progress=False)
            )
            for role, adapter, d in (("candidate", cyc.candidate, cand), ("active", active, act)):
                cyc.evals.setdefault(adapter or "base", {})[env] = d
                sums[role].append(
                    EvalSummary(**{k: v for k, v in d.items() if k in EvalSummary.model_fields})
                )
        self._save()
        margin, guard_margin = self.cfg.tuner.gate_margin, self.cfg.tuner.guard_margin
        # the target is the mean over environments; each environment is also a guard
        result = decide(
            _pooled(sums["candidate"]),
            _pooled(sums["active"]),
            margin=margin,
            guards=guards_from(sums["candidate"], sums["active"], guard_margin=guard_margin),
        )
        result.candidate, result.active = cyc.candidate, active
        registry.record_eval(
            cyc.candidate,
            {
                "gate": result.model_dump(),
                "candidate": [s.model_dump() for s in sums["candidate"]],
                "active": [s.model_dump() for s in sums["active"]],
                "active_version": active,
                "job": self.state.id,
            },
        )
        if result.promote:
            registry.promote(cyc.candidate, result)
        else:
            registry.reject(cyc.candidate, result)
        self.console.print(gate_table(result))
        cyc.gate = result.model_dump()

    async def _reload(self, cyc: CycleState) -> None:
        """Make running agents answer with the new active adapter (or keep the old one)."""
        from tuner.registry import open_registry
        from tuner.reload import reloader_for

        rec = open_registry(self.cfg).active()
        agent = await self._agent_started()
        await reloader_for(self.cfg, agent.engine).reload(rec)

    # -- the loop -------------------------------------------------------------------------------

    async def run_cycle(self, index: int) -> CycleState:
        cyc = next((c for c in self.state.cycles if c.index == index), None)
        if cyc is None:
            cyc = CycleState(index=index)
            self.state.cycles.append(cyc)
            self._save()
        t0 = time.perf_counter()
        steps = {
            "collect": self._collect,
            "dataset": self._dataset,
            "tune": self._tune,
            "gate": self._gate,
            "reload": self._reload,
        }
        for name in STEPS:
            if name in cyc.done:
                continue
            if cyc.skipped:
                break
            self.console.rule(f"cycle {index}: {name}")
            out = steps[name](cyc)
            if asyncio.iscoroutine(out):
                await out
            cyc.done.append(name)
            self._save()
        if cyc.skipped:
            self.console.print(f"[yellow]cycle {index} skipped training: {cyc.skipped}[/yellow]")
        cyc.wall_s = (cyc.wall_s or 0) + time.perf_counter() - t0
        self._save()
        return cyc

    async def run(self) -> JobState:
        deadline = time.time() + self.s.budget_minutes * 60 if self.s.budget_minutes else None
        try:
            await self._baseline()
            for i in range(1, self.s.cycles + 1):
                done = next((c for c in self.state.cycles if c.index == i), None)
                if done is not None and (done.skipped or set(STEPS) <= set(done.done)):
                    continue  # finished before a crash or a resume
                if deadline and time.time() > deadline:
                    self.console.print(
                        f"[yellow]budget of {self.s.budget_minutes:g} min spent: "
                        f"stopping before cycle {i}[/yellow]"
                    )
                    break
                await self.run_cycle(i)
            self.state.finished = time.time()
            self._save()
        finally:
            if self._agent is not None:
                await self._agent.aclose()
                self._agent = None
        return self.state


def _summary(res) -> EvalSummary:
    return EvalSummary(
        env=res.env,
        split=res.split,
        n=res.n,
        successes=res.successes,
        success_rate=res.success_rate,
        ci95=res.ci95,
        flag_rate=res.flag_rate,
        per_task=res.per_task(),
        seed=res.seed,
        sampling={"temperature": res.temperature, "few_shot": res.few_shot},
    )


def _pooled(sums: list[EvalSummary]) -> EvalSummary:
    """All environments' episodes as one summary (the gate's target metric)."""
    from agent.envs.run import wilson_interval

    n = sum(s.n for s in sums)
    wins = sum(s.successes for s in sums)
    return EvalSummary(
        env="+".join(s.env for s in sums),
        split=sums[0].split,
        n=n,
        successes=wins,
        success_rate=wins / n if n else 0.0,
        ci95=wilson_interval(wins, n),
        flag_rate=sum(s.flag_rate * s.n for s in sums) / n if n else 0.0,
        seed=sums[0].seed,
        sampling=sums[0].sampling,
    )


# -- report ---------------------------------------------------------------------------------------


def curve_points(state: JobState) -> list[tuple[str, dict[str, float]]]:
    """(label, {env: success rate}) in order: base, base few-shot, then each cycle's candidate."""
    points: list[tuple[str, dict[str, float]]] = []
    for label in ("base", "base few-shot"):
        if label in state.baseline:
            points.append((label, {e: d["success_rate"] for e, d in state.baseline[label].items()}))
    for cyc in state.cycles:
        if cyc.candidate and cyc.candidate in cyc.evals:
            verdict = "promoted" if cyc.gate.get("promote") else "rejected"
            points.append(
                (
                    f"c{cyc.index} {cyc.candidate} ({verdict})",
                    {e: d["success_rate"] for e, d in cyc.evals[cyc.candidate].items()},
                )
            )
    return points


def report_table(state: JobState) -> Table:
    envs = list(state.settings["envs"])
    table = Table(title=f"improve job {state.id}: zero-shot success on the held-out test split")
    table.add_column("model")
    for env in envs:
        table.add_column(env, justify="right")
    for label, rates in curve_points(state):
        table.add_row(label, *[f"{rates[e]:.1%}" if e in rates else "-" for e in envs])
    for cyc in state.cycles:
        if cyc.skipped:
            table.add_row(f"c{cyc.index} (skipped)", *["-" for _ in envs])
    return table


def plot_curve(state: JobState, path: Path) -> Path:
    """The learning curve as a PNG: success rate per point, one line per environment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = curve_points(state)
    labels = [p[0] for p in points]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(labels)), 4))
    for env in state.settings["envs"]:
        ys = [rates.get(env) for _, rates in points]
        xs = [i for i, y in enumerate(ys) if y is not None]
        ax.plot(xs, [ys[i] * 100 for i in xs], marker="o", label=env)
    ax.set_xticks(range(len(labels)), labels, rotation=15, ha="right")
    ax.set_ylabel("test success, %")
    ax.set_ylim(-2, 102)
    ax.set_title(f"selftune improve {state.id}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


async def improve(
    cfg: Config,
    settings: ImproveSettings,
    *,
    resume: bool | None = None,
    console: Console | None = None,
) -> JobState:
    """Run the improve job (cycles, or forever with `every_s`), under the workspace's job lock."""
    console = console or Console(stderr=True)
    with job_lock(cfg):
        while True:
            job = ImproveJob(cfg, settings, console)
            job.open(resume=resume)
            state = await job.run()
            png = plot_curve(state, job.dir / "learning_curve.png")
            Console().print(report_table(state))
            for cyc in state.cycles:
                if cyc.wall_s:
                    Console().print(
                        f"cycle {cyc.index}: {cyc.wall_s / 60:.1f} min"
                        + (
                            f", candidate {cyc.candidate}: {'promoted' if cyc.gate.get('promote') else 'rejected'}"
                            if cyc.candidate
                            else ""
                        )
                    )
            Console().print(f"learning curve: {png}", soft_wrap=True)  # a path must not wrap
            if not settings.every_s:
                return state
            resume = False
            console.print(f"next run in {settings.every_s / 3600:.2g} h (Ctrl-C to stop)")
            await asyncio.sleep(settings.every_s)
