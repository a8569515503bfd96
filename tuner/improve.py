"""The self-improvement job: collect -> grade -> dataset -> tune -> gate -> promote -> reload.

    selftune improve calculator --cycles 1

One cycle per iteration. Each step's outcome is written to the job's `state.json` as soon as
it is done, so a job that crashed resumes from the step it was in (`--resume`, the default
when the last job did not finish). A file lock keeps two jobs from overlapping; `--every 6h`
keeps running on a schedule.

With `--routes per-env` ([improve] routes) each environment gets a cycle chain of its own on
its own route of the registry, named for the environment: its cycle collects with the
adapter that answers that route, builds its dataset from that environment's rows (and the
replay rows), tunes from that adapter, is gated on that environment against it
(`evaluate_and_gate(route=...)`) and promotes on the route only. The state file records each
cycle's route; the default, `global`, is one chain for all environments, promoted globally.

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
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from agent.config import Config, ImproveConfig  # [improve], a section of the one config tree
from tools.errors import SelftuneError
from traces.times import TimeParseError, parse_duration

if TYPE_CHECKING:
    from agent.envs import Environment

STEPS = ("collect", "dataset", "tune", "gate", "reload")


class ImproveError(SelftuneError, RuntimeError):
    """The job cannot go on; the message says what to do."""


@dataclass
class CycleState:
    index: int
    route: str | None = None  # --routes per-env: the route (an environment's name) it trains
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
    traffic: dict[str, Any] = field(default_factory=dict)  # --source traffic: tuner/traffic.py
    replay: dict[str, Any] = field(default_factory=dict)  # env -> counts ([improve] replay)
    # per step: its wall seconds, and what the local engine computed in it (EngineStats'
    # difference; empty for other backends): benchmarks.bench_cycle's table comes from these
    step_s: dict[str, float] = field(default_factory=dict)
    step_engine: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class JobState:
    id: str
    settings: dict[str, Any]
    started: float = field(default_factory=time.time)
    finished: float | None = None
    cycles: list[CycleState] = field(default_factory=list)
    baseline: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> env -> summary
    baseline_s: float = 0.0  # the grader check and the baselines, as CycleState.step_s
    baseline_engine: dict[str, float] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=dict)  # dtype and threads of the local engine

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


async def collect(
    cfg: Config,
    env: str | Environment,
    settings: ImproveConfig,
    *,
    adapter: str | None,
    weak: bool,
    seed: int,
    agent: Any,
    tags: list[str],
    console: Console,
    solved_before: set[str] | frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Play `env`'s train tasks with `adapter`; returns the counts per wave. While the model is
    `weak`, first the reference wave (`[improve] reference_wave`: tasks with a reference and a
    `plan` or `search` are played by agent.envs.bootstrap.ReferencePolicy), then in up to four waves on
    the tasks it did not solve:
    1. with demonstrations (few-shot): the environment's own, or, when it has none and
       `[improve] self_demos`, ones written by calling the real tools on its train tasks
       (agent.envs.bootstrap.synthesise_demos); from wave 2 on, solved tasks' trajectories
       take their place, most similar first;
    2. the failed tasks again with their hints, where tasks have them (STaR's
       rationalization; the dataset puts the plain prompt back);
    3. the failed tasks without hints with their reference answer shown (`[improve]
       rationalise`); a right answer counts only if it came through the tools, else its grade
       is flagged `answer_not_from_tools` and the dataset drops it;
    4. the tasks still failed, with the most similar solved tasks as extra examples
       (bootstrapped few-shot: a solved task of the same kind shows which numbers go where).
    Expert iteration across cycles: tasks not solved in an earlier cycle (`solved_before`)
    are played first, so each better model works on what the last one failed.
    Measured on calculator with the base SmolLM2: a demonstration's operator is copied
    (0 of 132 sampled tries at temperature 1 found "+", "-" or "/" when both showed "*"),
    hints fix about half of those, and similar solved examples most of the rest.
    `tasks_solved` counts tasks with a right, unflagged episode (what the dataset can use);
    `unlearnable`, when set, says why no episode can be right (answers out of the tools' reach)."""
    from agent.envs import load_environment
    from agent.envs.bootstrap import answers_in_corpus, reference_playable, synthesise_demos
    from agent.envs.run import env_tools, run_suite

    given = env  # the teacher loads a named environment afresh (its own demos)
    environment = load_environment(env, config=cfg.agent) if isinstance(env, str) else env
    env = environment.name
    train = environment.split("train")
    # expert iteration: what earlier cycles failed (or never tried) first, then the rest
    train = sorted(train, key=lambda t: t.id in solved_before)[: settings.collect_limit]
    stats: dict[str, Any] = {"n": 0, "successes": 0, "waves": [], "unlearnable": None}
    if not train:
        stats.update(tasks_solved=0, few_shot=0)
        return stats
    # tasks with no tool at all are not search tasks: their answers need no corpus
    search_only = all(set(t.tools or environment.tool_names) == {"search"} for t in train)
    if search_only:
        found, with_ref = answers_in_corpus(train, environment.corpus_dir)
        stats["answers_in_corpus"] = [found, with_ref]
        if with_ref and not found:
            where = environment.corpus_dir or f"{environment.path} (it has no corpus/ folder)"
            stats.update(tasks_solved=0, few_shot=0)
            stats["unlearnable"] = (
                f"the reference answer of none of {with_ref} train tasks appears in the corpus "
                f"{where}, and `search` is their only tool: no episode can reach an answer "
                "through the tools, so nothing was collected or trained. Add the documents "
                "that hold the answers to corpus/, or check the tasks' answers"
            )
            return stats
    few = settings.few_shot if weak else 0
    own_demos = bool(environment.demos)
    synthetic: list[dict[str, Any]] = []
    if weak and few and not own_demos and settings.self_demos:
        synthetic, counts = await synthesise_demos(train, env_tools(cfg, environment), few)
        stats["self_demos"] = counts
        console.print(
            f"[bold]collect[/bold] {env}: no demos.jsonl; wrote {counts['kept']} demonstrations "
            f"by calling the tools ({counts['tried']} tried)"
        )
    environment.demos = environment.demos or synthetic
    waves: list[tuple[int, str]] = [(few, "demos")]
    if weak and settings.hints and any(t.hint for t in train):
        waves.append((few, "hinted"))
    if weak and settings.rationalise and any(not t.hint and t.answer is not None for t in train):
        waves.append((few, "answer"))
    if weak and few:
        waves.append((few + 2, "similar"))
    stats["few_shot"] = few
    solved: set[str] = set()  # tasks with a right, unflagged episode
    attempted: set[str] = set()
    ids_all = {t.id for t in train}
    playable = {t.id for t in train if reference_playable(t, environment.tool_names)}
    if weak and settings.reference_wave and playable:
        # first: a weak model solves few of these (8 % on user_retrieval in three waves), so
        # its own waves then play only what the reference policy could not
        wave = await _reference_wave(
            cfg, environment, playable, settings, seed=seed, tags=tags, console=console
        )
        solved |= set(wave.pop("solved"))
        attempted |= playable
        stats["n"] += wave["n"]
        stats["successes"] += wave["successes"]
        stats["waves"].append(wave)
    for wave, (k, which) in enumerate(waves):
        ids = ids_all - solved if which == "demos" else attempted - solved
        if which == "hinted":
            ids = {t.id for t in train if t.hint} & ids
        elif which == "answer":
            ids = {t.id for t in train if t.answer is not None and not t.hint} & ids
        if not ids or (which == "similar" and not solved):
            continue
        if wave and not own_demos:
            # solved tasks' own trajectories (from the store, most similar first) replace the
            # synthetic demonstrations as they come
            environment.demos = synthetic[: max(0, k - len(solved))]
        console.print(
            f"[bold]collect[/bold] {env} wave {wave + 1} ({which}): {len(ids)} train tasks, "
            f"few-shot {k}, adapter {adapter or 'base'}"
        )
        res = await run_suite(
            cfg,
            environment,
            split="train",
            task_ids=ids,
            concurrency=settings.concurrency,
            adapter=adapter or "base",
            few_shot=k,
            samples=settings.collect_samples,
            temperature=settings.collect_temperature if settings.collect_samples > 1 else None,
            seed=seed + wave,
            max_tokens=settings.max_tokens,
            agent=agent,
            tags=[*tags, f"wave:{which}"],
            progress=True,
            hints=which == "hinted",
            answer_shown=which == "answer",
        )
        kept = {o.task_id for o in res.outcomes if o.success and not o.flags}
        attempted |= {o.task_id for o in res.outcomes}
        solved |= kept
        stats["n"] += res.n
        stats["successes"] += res.successes
        stats["waves"].append(
            {
                "kind": which,
                "few_shot": k,
                "n": res.n,
                "successes": res.successes,
                "kept": sum(o.success and not o.flags for o in res.outcomes),
                "flags": dict(Counter(f for o in res.outcomes if o.success for f in o.flags)),
            }
        )
    if cfg.teacher.configured and attempted - solved:  # [teacher] plays what is still failed
        from tuner.teacher import teacher_wave

        wave = await teacher_wave(cfg, given, attempted - solved, seed=seed + len(waves), tags=tags,
                                  console=console)  # fmt: skip
        solved |= set(wave.pop("solved"))
        stats["n"] += wave["n"]
        stats["successes"] += wave["successes"]
        stats["waves"].append(wave)
    stats["tasks_solved"] = len(solved)
    stats["solved_ids"] = sorted(solved)
    stats["failed_ids"] = sorted(attempted - solved)
    if not solved and search_only and any(w["successes"] for w in stats["waves"]):
        flags = Counter(
            f for w in stats["waves"] for f, n in w.get("flags", {}).items() for _ in range(n)
        )
        stats["unlearnable"] = (
            f"{sum(w['successes'] for w in stats['waves'])} episodes gave the right answer, but "
            f"none through the tools ({dict(flags)}): nothing grounded to train on"
        )
    return stats


@contextmanager
def _traffic_store(cfg: Config):
    """The trace store for a traffic step; a bad `--since` or a traffic error becomes an
    ImproveError with its message, and the store is closed either way."""
    from agent.workspace import open_store
    from tuner.traffic import TrafficError

    store = open_store(cfg)
    try:
        yield store
    except TimeParseError as e:
        raise ImproveError(f"--since {e}") from None
    except TrafficError as e:
        raise ImproveError(str(e)) from None
    finally:
        store.close()


async def _reference_wave(
    cfg: Config,
    environment: Any,
    ids: set[str],
    settings: ImproveConfig,
    *,
    seed: int,
    tags: list[str],
    console: Console,
) -> dict[str, Any]:
    """Play `ids` (train tasks the student failed, with a reference and a plan or `search`)
    with the reference policy (agent.envs.bootstrap.ReferencePolicy) as the agent's model. Its episodes
    are real traces through the real tools and grader, tagged `source:reference`; only right,
    unflagged ones count as solved. Returns the wave's counts, with "solved" (task ids)."""
    from agent.agent import Agent
    from agent.envs.bootstrap import REFERENCE_POLICY, reference_policy
    from agent.envs.run import run_suite

    tasks = [t for t in environment.split("train") if t.id in ids]
    console.print(
        f"[bold]collect[/bold] {environment.name} reference wave: {len(tasks)} train tasks the "
        "student failed, played by the reference policy (a task's plan, else search with the "
        "question; through the real tools, answering only what their results hold)"
    )
    agent = Agent(cfg, checkpoints=False, chat_model=reference_policy(tasks))
    try:
        res = await run_suite(
            cfg, environment, split="train", task_ids=ids, concurrency=settings.concurrency,
            adapter="base", few_shot=0, seed=seed, agent=agent,
            tags=[*tags, "wave:reference", f"source:{REFERENCE_POLICY}"], progress=True,
        )  # fmt: skip
    finally:
        await agent.aclose()
    kept = sorted({o.task_id for o in res.outcomes if o.success and not o.flags})
    console.print(f"reference policy solved {len(kept)} of {len(tasks)} tasks")
    return {
        "kind": "reference",
        "few_shot": 0,
        "n": res.n,
        "successes": res.successes,
        "kept": len(kept),
        "flags": dict(Counter(f for o in res.outcomes if o.success for f in o.flags)),
        "solved": kept,
    }


def perturbed_copies(names: list[str], seed: int):
    """The dataset builder's rewrite for `[tuner] augment_perturbed`: each task's prompt as one
    of the perturbations `names`, drawn per task (seeded, so a resumed job rebuilds the same
    rows); when the drawn one leaves the prompt as it was (no long word to mistype), the next."""
    import random

    from agent.envs.perturb import perturb

    def rewrite(prompt: str, key: str) -> tuple[str, str] | None:
        order = list(names)
        random.Random(f"{seed}:{key}").shuffle(order)
        for name in order:
            text = perturb(prompt, name, seed, key)
            if text != prompt:
                return name, text
        return None

    return rewrite


class ImproveJob:
    """One improve job: its state file, its agent, and the loop over cycles."""

    def __init__(self, cfg: Config, settings: ImproveConfig, console: Console | None = None):
        self.cfg = cfg
        self.settings = settings
        self.console = console or Console(stderr=True)
        self.jobs_dir = cfg.workspace.jobs
        self.state: JobState | None = None
        self.dir: Path | None = None
        self._agent = None
        self._routes: dict[str | None, list[str]] | None = None
        self._judge_model = None  # tuner.teacher.JudgeModel, once `_judge` built it

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
                    state = JobState.load(f)
                except (json.JSONDecodeError, TypeError, KeyError):
                    continue
                return d if state.finished is None else None
        return None

    def open(self, resume: bool | None = None) -> None:
        """Start a new job, or resume the last one if it did not finish (`resume=None`: auto)."""
        unfinished = self._latest_unfinished()
        if unfinished is not None and resume is not False:
            self.dir = unfinished
            self.state = JobState.load(unfinished / "state.json")
            cycle = self.state.cycles[-1] if self.state.cycles else None
            where = (
                f"cycle {cycle.index}, after {cycle.done or 'nothing'}" if cycle else "the start"
            )
            self.console.print(f"[yellow]resuming job {self.state.id} from {where}[/yellow]")
            return
        if resume:
            raise ImproveError("there is no unfinished improve job to resume")
        job_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.dir = self.jobs_dir / f"improve-{job_id}"
        self.dir.mkdir(parents=True)
        self.state = JobState(id=job_id, settings=self.settings.model_dump())
        self._save()

    @contextmanager
    def _timed(self) -> Iterator[dict[str, Any]]:
        """Wall seconds and the local engine's work (EngineStats' difference) inside the block;
        the engine is only read if this process has loaded it, never loaded for this."""
        before = self._engine_stats()
        spent: dict[str, Any] = {}
        t0 = time.perf_counter()
        try:
            yield spent
        finally:
            spent["s"] = time.perf_counter() - t0
            after = self._engine_stats()
            spent["engine"] = {k: v - before.get(k, 0) for k, v in after.items()}

    def _engine_stats(self) -> dict[str, float]:
        from agent import workspace

        if self.cfg.model.backend != "local" or self._agent is None:
            return {}
        engine = workspace.get_engine(self.cfg)  # loaded already: the agent answers with it
        if not self.state.engine:
            import torch

            self.state.engine = {"dtype": str(engine.dtype), "threads": torch.get_num_threads()}
        return engine.stats.snapshot()

    # -- the pieces -----------------------------------------------------------------------------

    async def _agent_started(self):
        if self._agent is None:
            from agent.agent import Agent

            self._agent = Agent(self.cfg, checkpoints=False)
            await self._agent.start()
        return self._agent

    async def _baseline(self) -> None:
        """Base model zero-shot and few-shot on each environment, once per job (the learning
        curve's first two points)."""
        from tuner.gate import evaluate

        agent = None
        for label, k in (("base", 0), ("base few-shot", self.settings.few_shot)):
            for env in self.settings.envs:
                if env in self.state.baseline.get(label, {}):
                    continue
                self.console.print(f"[bold]baseline[/bold] {label} on {env}")
                agent = agent or await self._agent_started()
                res = await evaluate(
                    self.cfg, env, None, self.settings, few_shot=k, agent=agent, tags=self._tags()
                )
                self.state.baseline.setdefault(label, {})[env] = res.to_dict()
                self._save()

    def _tags(self) -> list[str]:
        return [f"job:{self.state.id}"]

    def routes(self) -> dict[str | None, list[str]]:
        """Each cycle chain's route and the environments it plays: {None: every environment}
        globally; per-env, {an environment's name: [that environment as given]}."""
        if self._routes is None:
            if self.settings.routes == "global":
                self._routes = {None: list(self.settings.envs)}
            else:
                self._routes = {}
                for env in self.settings.envs:
                    name = _route_name(self.cfg, env)
                    if name in self._routes:
                        raise ImproveError(
                            f"two environments are named {name!r} ({self._routes[name][0]} and "
                            f"{env}): with --routes per-env each needs a name of its own"
                        )
                    self._routes[name] = [env]
        return self._routes

    def _envs(self, cycle: CycleState) -> list[str]:
        """The environments `cycle` plays: its route's, or the job's for a global cycle."""
        return self.routes()[cycle.route] if cycle.route is not None else self.settings.envs

    def _active(self, route: str | None = None) -> str | None:
        """The version that answers `route` today (its own, else the global active; None: the
        base model): what a cycle on it collects with, tunes from and is gated against."""
        from tuner.registry import open_registry

        rec = open_registry(self.cfg).active_for(route)
        return rec.version if rec else None

    @staticmethod
    def _stem(cycle: CycleState) -> str:
        return f"cycle{cycle.index}" + (f"-{cycle.route}" if cycle.route else "")

    async def _collect(self, cycle: CycleState) -> None:
        """Play each environment's train tasks with the active model (`collect`)."""
        if self.settings.method == "grpo":
            return  # GRPO collects its own rollouts, from the policy it trains
        if self.settings.source in ("traffic", "both"):
            await self._collect_traffic(cycle)
            if self.settings.source == "traffic":
                return
        agent = await self._agent_started()
        active = self._active(cycle.route)
        for env in self._envs(cycle):
            known = self._latest_eval(env, active)
            # expert iteration: the tasks earlier cycles of this job solved go last
            solved_before = {
                t for c in self.state.cycles for t in c.collect.get(env, {}).get("solved_ids", [])
            }
            cycle.collect[env] = await collect(
                self.cfg,
                env,
                self.settings,
                adapter=active,
                weak=known is None or known["success_rate"] < self.settings.weak_below,
                seed=self.settings.seed + 1000 * cycle.index,
                agent=agent,
                tags=[*self._tags(), f"cycle:{cycle.index}", "collect"],
                console=self.console,
                solved_before=solved_before,
            )
        reasons = {e: c["unlearnable"] for e, c in cycle.collect.items() if c.get("unlearnable")}
        unlearnable = reasons and not any(c.get("tasks_solved") for c in cycle.collect.values())
        if unlearnable and self.settings.source == "envs":  # `both`: the traffic may still teach
            cycle.skipped = "nothing learnable: " + "; ".join(
                f"{e}: {r}" for e, r in reasons.items()
            )
            return
        for env in self._replay_envs(cycle):
            cycle.replay[env] = await self._replay(env, cycle, agent, active)

    def _replay_envs(self, cycle: CycleState) -> list[str]:
        """`[improve] replay` less the cycle's own environments (their rows are there anyway)."""
        return [e for e in self.settings.replay if e not in self._envs(cycle)]

    async def _replay(self, env: str, cycle: CycleState, agent: Any, active: str | None) -> dict:
        """The active model plays `env`'s train tasks zero-shot; its right, unflagged answers
        become dataset rows (tagged `wave:replay`), so that what it already does well is trained
        beside the new skill instead of being overwritten by it. Each task is played greedily,
        then `replay_samples - 1` times at `replay_temperature`: the SFT dataset keeps each
        task's shortest right answer (best of n), not a rambling one that happens to hold
        the reference."""
        from agent.envs import load_environment
        from agent.envs.run import run_suite

        environment = load_environment(env, config=self.cfg.agent)
        extra = self.settings.replay_samples - 1
        self.console.print(
            f"[bold]collect[/bold] replay {env}: the train tasks, zero-shot, adapter "
            f"{active or 'base'}, greedy"
            + (f" and {extra} samples" if extra else "")
            + " (its shortest right answers are trained beside the new rows)"
        )
        seed = self.settings.seed + 1000 * cycle.index
        plays = [(1, 0.0, seed)]
        if extra:
            plays.append((extra, self.settings.replay_temperature, seed + 1))
        out = {"n": 0, "successes": 0, "kept": 0}
        for samples, temperature, s in plays:
            res = await run_suite(
                self.cfg, environment, split="train", concurrency=self.settings.concurrency,
                adapter=active or "base", few_shot=0, samples=samples, temperature=temperature,
                seed=s, max_tokens=self.settings.max_tokens, agent=agent, progress=True,
                tags=[*self._tags(), f"cycle:{cycle.index}", "collect", "wave:replay"],
            )  # fmt: skip
            out["n"] += res.n
            out["successes"] += res.successes
            out["kept"] += sum(o.success and not o.flags for o in res.outcomes)
        return out

    async def _judge(self):
        """The LLM judge `[improve] judge` names (the base model or the teacher:
        tuner.teacher.make_judge), built once per job; None when off."""
        from tuner.teacher import make_judge

        if not self.settings.judge:
            return None
        if self._judge_model is None:
            # the judge writes a score line first: the episodes' token cap is enough for it
            self._judge_model = await make_judge(
                self.cfg, self.settings.judge, max_tokens=self.settings.max_tokens
            )
        return self._judge_model

    async def _collect_traffic(self, cycle: CycleState) -> None:
        """Select and grade the recorded traffic (tuner.traffic.select_traffic), with the LLM
        judge (`_judge`) for unmatched questions when `[improve] judge`; the selection, its
        held-out sessions, which judge graded and what was left out go into the cycle's state."""
        from agent.envs import environment_tasks
        from tuner.traffic import select_traffic

        tasks: dict = {}
        for env in self.settings.envs:
            tasks.update(environment_tasks(env, self.cfg)[1])
        judge = await self._judge()
        with _traffic_store(self.cfg) as store:
            sel = await select_traffic(
                store,
                since=self.settings.since,
                holdout=self.settings.traffic_holdout,
                tasks=tasks,
                judge_model=judge.model if judge else None,
                judge_grader=judge.grader if judge else "judge",
                scrub_patterns=self.cfg.traces.scrub_patterns,
            )
        cycle.traffic = s = sel.summary()
        unmatched = sum(i.grade_source is None for i in sel.items)
        if judge is not None:
            s["judge_description"] = judge.description
            judged = (
                f"; the judge ({judge.description}) graded {s['judge_graded']} "
                f"({s['judge_failed']} failed)"
            )
        else:
            judged = f"; {unmatched} ungraded (--judge grades them)" if unmatched else ""
        weak = f"; {s['weak_labelled']} weak-labelled only" if s["weak_labelled"] else ""
        self.console.print(
            f"[bold]collect[/bold] traffic: {s['traces']} traces in {s['sessions']} sessions "
            f"(graded by {s['graded_by']}{judged}{weak}), {s['heldout_traces']} held out; left "
            f"out: {s['excluded'] or 'none'}",
            highlight=False,
        )
        if self.settings.traffic_replay:
            await self._replay_traffic(cycle, sel)

    async def _replay_traffic(self, cycle: CycleState, sel: Any) -> None:
        """Play the training questions whose served answer missed a known good answer again
        (tuner.traffic.replay_items), in a copy of the environment each belongs to (matched
        task's, else the job's first), through `collect`'s waves; each question's first right,
        unflagged episode becomes its row. The items and the waves' counts go into the state."""
        from agent.envs import load_environment
        from agent.workspace import open_store
        from traces.datasets import scoring_grade
        from traces.schemas import TraceQuery
        from tuner.traffic import REPLAY_TAG, replay_environment, replay_items

        items = replay_items(sel)
        if not items:
            cycle.traffic["replay"] = {"questions": 0}
            return
        agent = await self._agent_started()
        active = self._active(cycle.route)
        by_env: dict[str, list] = {}
        for i in items:
            by_env.setdefault(i.env or self.settings.envs[0], []).append(i)
        tag = f"{REPLAY_TAG}:{self.state.id}:{cycle.index}"
        stats: dict[str, Any] = {"questions": len(items), "envs": {}}
        for env, group in by_env.items():
            source = load_environment(env, config=self.cfg.agent)
            environment = replay_environment(group, source)
            for i in group:
                task = environment.task(i.trace_id)
                i.replayed = True
                i.needs_tools = i.used_tools or (
                    i.env is not None and bool(task.tools or source.tool_names)
                )
            stats["envs"][env] = await collect(
                self.cfg,
                environment,
                self.settings.updated(collect_limit=len(group)),
                adapter=active,
                weak=True,  # each question already failed: every wave may help
                seed=self.settings.seed + 1000 * cycle.index + 500,
                agent=agent,
                tags=[*self._tags(), f"cycle:{cycle.index}", "collect", REPLAY_TAG, tag],
                console=self.console,
            )
        store = open_store(self.cfg)
        try:
            kept: dict[str, str] = {}
            for t in store.query(TraceQuery(tag=tag, limit=None)):
                g = scoring_grade(store.grades(t.id))
                good = g is not None and g.value >= 1.0 and not g.flags and t.status == "ok"
                if good and t.task_id is not None and t.task_id not in kept:
                    kept[t.task_id] = t.id
        finally:
            store.close()
        for i in items:
            i.replay = kept.get(i.trace_id)
        stats["kept"] = len(kept)
        stats["needs_tools_unsolved"] = sum(i.needs_tools and not i.replay for i in items)
        cycle.traffic["items"] = [asdict(i) for i in sel.items]
        cycle.traffic["replay"] = stats
        self.console.print(
            f"[bold]collect[/bold] traffic replay: {len(kept)} of {len(items)} questions the "
            f"served answer missed now have a right episode through the tools; "
            f"{stats['needs_tools_unsolved']} that need a tool have none (their bare corrections "
            "are not trained on)",
            highlight=False,
        )

    def _latest_eval(self, env: str, adapter: str | None) -> dict[str, Any] | None:
        label = adapter or "base"
        for cycle in reversed(self.state.cycles):
            if env in cycle.evals.get(label, {}):
                return cycle.evals[label][env]
        return self.state.baseline.get("base", {}).get(env) if adapter is None else None

    async def _dataset(self, cycle: CycleState) -> None:
        from agent.workspace import open_store
        from traces.datasets import DatasetError, build_dataset

        method = self.settings.method
        if method == "grpo":
            return  # no dataset: GRPO learns from its rollouts' grades
        store = open_store(self.cfg)
        if self.settings.source == "traffic":
            self._dataset_traffic(cycle, store)
            return
        if self.settings.source == "both":
            self._dataset_both(cycle, store)
            return
        new_passing = sum(c.get("tasks_solved", c["successes"]) for c in cycle.collect.values())
        need = self.settings.min_new_traces
        if new_passing < need:
            cycle.skipped = (
                f"only {new_passing} new passing traces this cycle (need {need}, [improve] "
                "min_new_traces): collect more tasks (--collect-limit) or lower the threshold"
            )
            return
        out = self.dir / f"{self._stem(cycle)}-{method}"
        tasks, filters, augment = self._episode_inputs(cycle)
        try:
            res = build_dataset(
                store, method, out, filters, tasks=tasks,
                scrub_patterns=self.cfg.traces.scrub_patterns, augment=augment,
            )  # fmt: skip
        except DatasetError as e:
            cycle.skipped = f"no dataset: {e}"
            return
        cycle.dataset = {"dir": str(out), "rows": res.rows, "manifest": str(out / "manifest.json")}
        self._count_extra_rows(cycle, res.manifest)

    def _episode_inputs(self, cycle: CycleState) -> tuple[dict, Any, Any]:
        """What a dataset of this cycle's episodes is built from: the tasks of its environments
        and of replay's, the filters (the passing, unflagged traces since the cycle began: its
        own collection and replay only, as the routes' cycles run one after another), and the
        `[tuner] augment_perturbed` rewrite (None when off)."""
        from agent.envs import environment_tasks
        from traces.datasets import DatasetFilters

        method = self.settings.method
        tasks: dict = {}
        for env in [*self._envs(cycle), *cycle.replay]:
            tasks.update(environment_tasks(env, self.cfg)[1])
        filters = DatasetFilters(
            min_score=1.0, best_of_n=method == "sft", since=cycle.started, exclude_flagged=True
        )
        names = self.cfg.tuner.augment_perturbed if method == "sft" else []
        augment = perturbed_copies(names, self.settings.seed + cycle.index) if names else None
        return tasks, filters, augment

    @staticmethod
    def _count_extra_rows(cycle: CycleState, manifest: dict[str, Any]) -> None:
        """Replay's rows per environment and the perturbed copies, from the manifest's counts."""
        counts = manifest["counts"]
        if cycle.replay:
            by_env = counts.get("by_env", {})
            cycle.dataset["replay_rows"] = {e: by_env.get(e, 0) for e in cycle.replay}
        if "augmented" in counts:
            cycle.dataset["augmented"] = counts["augmented"]

    def _dataset_traffic(self, cycle: CycleState, store: Any) -> None:
        """Rows from the traffic's training sessions (tuner.traffic.build_traffic_dataset);
        fewer than `min_new_traces` rows: the cycle is skipped, saying why."""
        from traces.datasets import DatasetError
        from tuner.traffic import TrafficSelection, build_traffic_dataset

        method = self.settings.method
        out = self.dir / f"cycle{cycle.index}-traffic-{method}"
        sel = TrafficSelection.from_summary(cycle.traffic)
        try:
            res = build_traffic_dataset(
                store, sel, method, out, scrub_patterns=self.cfg.traces.scrub_patterns,
                weak_labels=self.settings.weak_labels,
            )  # fmt: skip
        except DatasetError as e:
            cycle.skipped = f"no traffic dataset: {e}"
            return
        need = self.settings.min_new_traces
        if res.rows < need:
            cycle.skipped = (
                f"only {res.rows} {method} rows from traffic (need {need}, [improve] "
                "min_new_traces): gather more feedback (POST /v1/feedback), widen --since, or "
                "lower the threshold"
            )
            return
        cycle.dataset = {
            "dir": str(out),
            "rows": res.rows,
            "manifest": str(out / "manifest.json"),
            "rows_by_signal": _rows_by_signal(out),
            "excluded": res.manifest.get("excluded", {}),
        }

    def _dataset_both(self, cycle: CycleState, store: Any) -> None:
        """`--source both`: this cycle's passing episodes on the environments' train tasks and
        the traffic's training sessions in one dataset (tuner.traffic.build_mixed_dataset);
        fewer than `min_new_traces` rows in all: the cycle is skipped, saying why."""
        from traces.datasets import DatasetError
        from tuner.traffic import TrafficSelection, build_mixed_dataset

        method = self.settings.method
        out = self.dir / f"cycle{cycle.index}-both-{method}"
        tasks, filters, augment = self._episode_inputs(cycle)
        try:
            res, sides = build_mixed_dataset(
                store, TrafficSelection.from_summary(cycle.traffic), method, out, filters,
                tasks=tasks, scrub_patterns=self.cfg.traces.scrub_patterns,
                weak_labels=self.settings.weak_labels, augment=augment,
            )  # fmt: skip
        except DatasetError as e:
            cycle.skipped = f"no dataset: {e}"
            return
        need = self.settings.min_new_traces
        if res.rows < need:
            cycle.skipped = (
                f"only {res.rows} {method} rows ({sides['envs']} from the environments, "
                f"{sides['traffic']} from traffic; need {need}, [improve] min_new_traces): collect "
                "more tasks (--collect-limit), gather more feedback, or lower the threshold"
            )
            return
        cycle.dataset = {
            "dir": str(out),
            "rows": res.rows,
            "manifest": str(out / "manifest.json"),
            "rows_from": sides,
            "rows_by_signal": _rows_by_signal(out),
            "excluded": res.manifest.get("excluded", {}),
        }
        self._count_extra_rows(cycle, res.manifest)

    async def _tune(self, cycle: CycleState) -> None:
        """Train a candidate from the active adapter: GRPO online, or on the cycle's dataset."""
        if self.settings.method == "grpo":
            await self._tune_grpo(cycle)
            return
        from tuner.sanity import SanityError
        from tuner.train import TrainError, tune

        active = self._active(cycle.route)
        max_steps = self.settings.max_train_steps
        on = f", route {cycle.route}" if cycle.route else ""
        try:
            rec = tune(
                self.settings.method,
                cycle.dataset["dir"],
                self.cfg,
                from_version=active,
                config=self.cfg.tuner.train.updated(
                    seed=self.settings.seed, max_steps=max_steps if max_steps > 0 else None
                ),
                resume="auto",  # a killed tune step goes on from its last checkpoint
                out_dir=self.dir / f"{self._stem(cycle)}-adapter",
                isolated=True,  # this process holds the model for inference
                notes=[f"improve job {self.state.id}, cycle {cycle.index}{on}"],
            )
        except SanityError as e:  # trained on nothing worth gating: stop this cycle, say why
            cycle.skipped = f"sanity check failed: {e}"
            cycle.train_metrics = {"verdicts": [v.model_dump() for v in e.verdicts]}
            return
        except TrainError as e:
            raise ImproveError(
                f"cycle {cycle.index}: training failed: {e} (`selftune improve` resumes from the "
                "tune step and its last checkpoint)"
            ) from None
        cycle.candidate = rec.version
        cycle.train_metrics = {**rec.metrics, "verdicts": [v.model_dump() for v in rec.verdicts]}

    async def _tune_grpo(self, cycle: CycleState) -> None:
        """Online RL from the active adapter; a killed run resumes at its last step."""
        from tuner.grpo import GrpoError, GrpoRun
        from tuner.sanity import SanityError

        envs = self._envs(cycle)
        if len(envs) != 1:
            raise ImproveError(
                "--method grpo trains on one environment: give exactly one, or --routes per-env"
            )
        max_steps = self.settings.max_train_steps
        grpo_config = self.cfg.tuner.grpo.updated(
            steps=max_steps if max_steps > 0 else None,
            max_tokens=self.settings.max_tokens,
            concurrency=self.settings.concurrency,
            seed=self.settings.seed,
        )
        env = envs[0]
        try:
            run = GrpoRun(self.cfg, env, grpo_config, resume=True, console=self.console)
        except GrpoError:  # nothing to resume: a new run from the active adapter
            run = GrpoRun(
                self.cfg, env, grpo_config, start_from=self._active(cycle.route),
                console=self.console,
            )  # fmt: skip
        try:
            rec = await run.run()
        except SanityError as e:
            cycle.skipped = f"sanity check failed: {e}"
            cycle.train_metrics = {"grpo_run": run.state.id, "steps": run.state.step}
            return
        cycle.candidate = rec.version
        cycle.train_metrics = {"grpo_run": run.state.id, "steps": run.state.step}

    async def _gate(self, cycle: CycleState) -> None:
        """Active and candidate on the same held-out tasks and the guards, decided by the one
        gate (`evaluate_and_gate`, as `selftune gate` does); a route's cycle is decided for its
        route, against what answers it, and promoted there."""
        from tuner.gate import evaluate_and_gate
        from tuner.registry import open_registry

        active = self._active(cycle.route)
        envs = self._envs(cycle)
        extra, record = [], {"job": self.state.id}
        if self.settings.source in ("traffic", "both"):
            from tuner.traffic import TrafficSelection, heldout_environment

            sel = TrafficSelection.from_summary(cycle.traffic)
            slice_env = heldout_environment(sel, self.cfg.agent.tools, self.dir)
            extra = [slice_env] if slice_env is not None else []
            record["traffic"] = {
                "heldout_sessions": cycle.traffic["heldout_sessions"],
                "heldout_tasks": len(slice_env.tasks) if slice_env else 0,
            }
            if slice_env is None:
                self.console.print(
                    "[yellow]gate: no held-out traffic with a known good answer; the "
                    "environments' tests alone decide[/yellow]"
                )
        result, candidate_results, active_results = await evaluate_and_gate(
            self.cfg,
            open_registry(self.cfg),
            cycle.candidate,
            active,
            envs,
            self.settings,
            agent=await self._agent_started(),
            tags=self._tags(),
            record=record,
            console=self.console,
            extra=extra,
            route=cycle.route,
        )
        if extra:
            from tuner.traffic import HELDOUT_ENV

            cand = next(r for r in candidate_results if r.env == HELDOUT_ENV)
            act = next(r for r in active_results if r.env == HELDOUT_ENV)
            cycle.traffic["gate"] = {
                "n": cand.n,
                "candidate": cand.success_rate,
                "active": act.success_rate,
                "candidate_ci95": list(cand.ci95),
                "active_ci95": list(act.ci95),
            }
        names = {r.env for r in candidate_results[: len(envs)]}
        for adapter, results in ((cycle.candidate, candidate_results), (active, active_results)):
            for res in results:  # the job's own environments, clean: the learning curve's points
                if res.perturb is None and res.env in names:
                    cycle.evals.setdefault(adapter or "base", {})[res.env] = res.to_dict()
        cycle.gate = result.model_dump()

    async def _reload(self, cycle: CycleState) -> None:
        """Make running agents answer with the new active adapter (or keep the old one). A
        route's adapter needs no reload: the router reads the registry's pointer per request,
        and the engine or vLLM loads a version by name on its first routed request."""
        from agent.workspace import get_engine
        from tuner.registry import open_registry
        from tuner.reload import reloader_for

        if cycle.route is not None:
            rec = open_registry(self.cfg).route_active(cycle.route)
            self.console.print(
                f"route {cycle.route}: {rec.version if rec else 'none (the global active)'}"
                " answers its requests from the next one on"
            )
            return

        rec = open_registry(self.cfg).active()
        # the local backend: the process's one engine, which every agent here answers with
        engine = get_engine(self.cfg) if self.cfg.model.backend == "local" else None
        await reloader_for(self.cfg, engine).reload(rec)

    # -- the loop -------------------------------------------------------------------------------

    def _cycle(self, index: int, route: str | None) -> CycleState | None:
        return next((c for c in self.state.cycles if c.index == index and c.route == route), None)

    async def run_cycle(self, index: int, route: str | None = None) -> CycleState:
        """Cycle `index` of `route`'s chain (None: the global one), from its first step not
        done."""
        cycle = self._cycle(index, route)
        if cycle is None:
            cycle = CycleState(index=index, route=route)
            self.state.cycles.append(cycle)
            self._save()
        t0 = time.perf_counter()
        on = f" (route {route})" if route else ""
        steps = {
            "collect": self._collect,
            "dataset": self._dataset,
            "tune": self._tune,
            "gate": self._gate,
            "reload": self._reload,
        }
        for name in STEPS:
            if name in cycle.done:
                continue
            if cycle.skipped:
                break
            self.console.rule(f"cycle {index}{on}: {name}")
            with self._timed() as spent:
                await steps[name](cycle)
            cycle.step_s[name] = cycle.step_s.get(name, 0.0) + spent["s"]
            cycle.step_engine[name] = _add(cycle.step_engine.get(name, {}), spent["engine"])
            cycle.done.append(name)
            self._save()
        if cycle.skipped:
            self.console.print(
                f"[yellow]cycle {index}{on} skipped training: {cycle.skipped}[/yellow]"
            )
        cycle.wall_s = (cycle.wall_s or 0) + time.perf_counter() - t0
        self._save()
        return cycle

    def _check_traffic(self) -> None:
        """Fail at once, saying how to record some, when there is no traffic in the window."""
        from tuner.traffic import check_traffic

        with _traffic_store(self.cfg) as store:
            check_traffic(store, self.settings.since)

    async def _check_graders(self) -> None:
        """Reward integrity before anything is paid for: each environment's grader must give
        the references 1 and empty, constant and echoed answers 0 (`selftune check`)."""
        from agent.envs import load_environment
        from agent.envs.check import check_environment

        for env in self.settings.envs:
            report = await check_environment(load_environment(env, config=self.cfg.agent))
            if report.blocks_training():
                raise ImproveError(report.summary())
            if report.failures:
                self.console.print(f"[yellow]warning:[/yellow] {report.summary()}", highlight=False)

    async def run(self) -> JobState:
        budget = self.settings.budget_minutes
        deadline = time.time() + budget * 60 if budget else None
        if self.settings.source != "envs" and self.settings.method == "grpo":
            raise ImproveError(
                f"--source {self.settings.source} builds a dataset from the traffic, and GRPO "
                "learns from its own rollouts: use --method sft, dpo or kto, or --source envs"
            )
        if self.settings.weak_labels and self.settings.method != "kto":
            raise ImproveError(
                f"--weak-labels gives KTO labels (an answer the user asked again about is not "
                f"good), not {self.settings.method} rows: add --method kto, or drop --weak-labels"
            )
        try:
            if self.settings.routes != "global" and self.settings.source != "envs":
                raise ImproveError(
                    "--routes per-env learns each environment on its own route, and traffic "
                    "has no environment to split by: use --source envs, or --routes global"
                )
            routes = list(self.routes())  # fails on environment names that are no route names
            if self.settings.source in ("traffic", "both"):
                await self._judge()  # a teacher judge missing or not answering: say so now
            with self._timed() as spent:
                await self._check_graders()
                if self.settings.source in ("traffic", "both"):
                    self._check_traffic()  # before the baseline's minutes are spent
                await self._baseline()
            self.state.baseline_s += spent["s"]
            self.state.baseline_engine = _add(self.state.baseline_engine, spent["engine"])
            self._save()
            for i, route in ((i, r) for i in range(1, self.settings.cycles + 1) for r in routes):
                done = self._cycle(i, route)
                if done is not None and (done.skipped or set(STEPS) <= set(done.done)):
                    continue  # finished before a crash or a resume
                if deadline and time.time() > deadline:
                    on = f" on route {route}" if route else ""
                    self.console.print(
                        f"[yellow]budget of {budget:g} min spent: stopping before cycle {i}{on}"
                        "[/yellow]"
                    )
                    break
                await self.run_cycle(i, route)
            self.state.finished = time.time()
            self._save()
        finally:
            if self._agent is not None:
                await self._agent.aclose()
                self._agent = None
        return self.state


def _add(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in {*a, *b}}


def _rows_by_signal(dataset_dir: Path) -> dict[str, int]:
    """A traffic dataset's rows counted by the signal that labelled them (its provenance)."""
    provenance = json.loads((dataset_dir / "provenance.json").read_text())
    return dict(sorted(Counter(p["signal"] for p in provenance).items()))


def _route_name(cfg: Config, env: str) -> str:
    """The route of `env`'s chain with --routes per-env: the environment's own name ("docs-qa"
    for the folder docs_qa, a user folder's name), as its traces and the router call it."""
    from agent.envs import environment_tasks
    from agent.model.adapters import RegistryError, check_route

    name = environment_tasks(env, cfg)[0]
    try:
        return check_route(name)
    except RegistryError as e:
        raise ImproveError(f"environment {env}: {e}") from None


# -- report ---------------------------------------------------------------------------------------


def curve_points(state: JobState) -> list[tuple[str, dict[str, float]]]:
    """(label, {env: success rate}) in order: base, base few-shot, then each cycle's candidate."""
    points: list[tuple[str, dict[str, float]]] = []
    for label in ("base", "base few-shot"):
        if label in state.baseline:
            points.append((label, {e: d["success_rate"] for e, d in state.baseline[label].items()}))
    for cycle in state.cycles:
        if cycle.candidate and cycle.candidate in cycle.evals:
            verdict = "promoted" if cycle.gate.get("promote") else "rejected"
            on = f" on {cycle.route}" if cycle.route else ""
            points.append(
                (
                    f"c{cycle.index} {cycle.candidate} ({verdict}{on})",
                    {e: d["success_rate"] for e, d in cycle.evals[cycle.candidate].items()},
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
    for cycle in state.cycles:
        if cycle.skipped:
            on = f" {cycle.route}" if cycle.route else ""
            table.add_row(f"c{cycle.index}{on} (skipped)", *["-" for _ in envs])
    return table


def plot_curve(state: JobState, path: Path) -> Path:
    """The learning curve as a PNG: success rate per point, one line per environment."""
    from tuner.plots import learning_curve

    title = f"selftune improve {state.id}"
    return learning_curve(curve_points(state), state.settings["envs"], title, path)


async def improve(
    cfg: Config,
    settings: ImproveConfig | None = None,
    *,
    every_s: float | None = None,
    resume: bool | None = None,
    console: Console | None = None,
) -> JobState:
    """Run the improve job (`settings` default `[improve]`), under the workspace's job lock;
    with `every_s`, again and again, that many seconds apart."""
    settings = settings or cfg.improve
    console = console or Console(stderr=True)
    with job_lock(cfg):
        while True:
            job = ImproveJob(cfg, settings, console)
            job.open(resume=resume)
            state = await job.run()
            png = plot_curve(state, job.dir / "learning_curve.png")
            Console().print(report_table(state))
            for cycle in state.cycles:
                if cycle.wall_s:
                    verdict = "promoted" if cycle.gate.get("promote") else "rejected"
                    if cycle.route:
                        verdict += f" on route {cycle.route}"
                    Console().print(
                        f"cycle {cycle.index}{' ' + cycle.route if cycle.route else ''}: "
                        f"{cycle.wall_s / 60:.1f} min"
                        + (f", candidate {cycle.candidate}: {verdict}" if cycle.candidate else "")
                    )
            Console().print(f"learning curve: {png}", soft_wrap=True)  # a path must not wrap
            if not every_s:
                return state
            resume = False
            console.print(f"next run in {every_s / 3600:.2g} h (Ctrl-C to stop)")
            await asyncio.sleep(every_s)
