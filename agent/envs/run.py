"""Running the agent on an environment's tasks: `selftune eval` and `selftune collect`.

Episodes run concurrently (so the local backend batches their model calls into one
`generate`), every trace is graded as soon as it is stored, and the run's statistics come
back as a `SuiteResult`. All traces of a run carry the tag `run:<run_id>`.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.agent import Agent, RunResult
from agent.config import Config
from agent.envs import Environment, load_environment
from agent.envs.bootstrap import NOT_FROM_TOOLS, answer_prompt, through_tools
from agent.envs.perturb import perturb as perturb_prompt
from tools.base import Tool
from traces.schemas import Grade, Task, Trace

SUCCESS_THRESHOLD = 0.5  # a grade at or above this counts as a success


@dataclass
class EpisodeOutcome:
    task_id: str
    sample: int
    trace_id: str
    status: str
    score: float
    success: bool
    flags: list[str]
    steps: int
    tokens: int
    wall_s: float
    answer: str | None
    grade_error: str | None = None
    grade_s: float = 0.0
    kind: str = "-"  # the task's kind, for the gate's per-kind report (task_kind)


def task_kind(task: Task) -> str:
    """What kind of task this is, from its metadata: `kind`, else the generator's `template`,
    else the `source` document; "-" when it says none."""
    meta = task.metadata or {}
    return str(meta.get("kind") or meta.get("template") or meta.get("source") or "-")


class SuiteResult(BaseModel):
    """One run of one model (base or adapter) on one environment's split: the statistics and
    every episode's outcome. The one eval result type: `selftune eval` prints it, the eval gate
    decides on two of them (candidate and active, the same episodes), and the adapter registry
    stores `to_dict()` (the outcomes left out, the per-task scores kept)."""

    model_config = ConfigDict(extra="forbid")

    env: str
    split: str = "test"
    run_id: str = ""
    adapter: str | None = None
    n: int = Field(ge=0)
    successes: int = Field(ge=0)
    success_rate: float = Field(ge=0.0, le=1.0)
    ci95: tuple[float, float] = (0.0, 1.0)
    mean_steps: float = 0.0
    mean_tokens: float = 0.0
    mean_wall_s: float = 0.0
    flag_rate: float = Field(default=0.0, ge=0.0, le=1.0)  # e.g. reward-hacking flags
    wall_s: float = 0.0
    few_shot: int = 0
    samples: int = 1
    temperature: float | None = None
    seed: int = 0
    perturb: str | None = None  # the prompts as this perturbation wrote them (None: clean)
    outcomes: list[EpisodeOutcome] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> SuiteResult:
        if self.successes > self.n:
            raise ValueError(f"successes={self.successes} is more than n={self.n}")
        if self.n and abs(self.successes / self.n - self.success_rate) > 1e-6:
            raise ValueError(
                f"success_rate={self.success_rate} does not match successes/n="
                f"{self.successes}/{self.n}"
            )
        return self

    def per_task(self) -> dict[str, float]:
        """Mean score per task over its samples."""
        scores: dict[str, list[float]] = {}
        for o in self.outcomes:
            scores.setdefault(o.task_id, []).append(o.score)
        return {k: sum(v) / len(v) for k, v in sorted(scores.items())}

    def to_dict(self, with_outcomes: bool = False) -> dict[str, Any]:
        d = self.model_dump(exclude=None if with_outcomes else {"outcomes"})
        d["ci95"] = list(self.ci95)
        d["per_task"] = self.per_task()
        return d


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval for a success rate (sane at 0 % and 100 %, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def env_tools(cfg: Config, env: Environment) -> list[Tool]:
    """The environment's own tools plus, for an environment with a corpus, a `search` tool
    over that corpus (indexed incrementally into its own collection first)."""
    tools = list(env.tools)
    if env.corpus_dir is not None:
        from agent.workspace import open_collection
        from retrieval import index_paths, make_search_tool

        coll = open_collection(cfg, env.collection or f"env-{env.name}")
        index_paths([env.corpus_dir], coll, cfg.retrieval.chunk_chars, cfg.retrieval.chunk_overlap)
        r = cfg.retrieval
        tools.append(make_search_tool(coll, k=r.top_k, ranking=r.ranking, passage=r.passage))
    return tools


def demo_messages(
    env: Environment, k: int, store=None, exclude_task: str | None = None, prompt: str | None = None
) -> list[dict]:
    """K worked examples as prior turns: the environment's own demonstrations first, then the
    best-graded past traces of other tasks in the same environment, most similar to `prompt`
    first (a task of the same kind shows the model which numbers go where).

    The last example is cut right after its first tool call. Measured on calculator's test
    split with the base SmolLM2 (16 tasks): full examples 3/16 right, the last one ending on a
    call 6/16; a small model imitates the most recent assistant turn, and one that ends on a
    call makes it start with a call too.
    """
    if k <= 0:
        return []
    convs: list[list[dict]] = [
        [m for m in d["messages"] if m.get("role") != "system"] for d in env.demos[:k]
    ]
    if len(convs) < k and store is not None:
        from traces.read import training_conversation

        past = _best_past_traces(store, env.name, k - len(convs), exclude_task, prompt)
        for trace in reversed(past):  # the most similar ends up nearest the question
            messages, _ = training_conversation(trace)
            convs.append([m for m in messages if m.get("role") != "system"])
    if convs:
        last = convs[-1]
        first_call = next((i for i, m in enumerate(last) if m.get("tool_calls")), None)
        if first_call is not None:
            convs[-1] = last[: first_call + 1]
    return [m for conv in convs for m in conv]


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) > 2}


def _best_past_traces(
    store, env_name: str, k: int, exclude_task: str | None, prompt: str | None
) -> list[Trace]:
    """Up to k passing traces of distinct other tasks, most similar prompt first (word overlap)."""
    from traces.schemas import TraceQuery

    best: dict[str, Trace] = {}
    for t in store.query(TraceQuery(env=env_name, status="ok", min_grade=1.0, limit=500)):
        if t.task_id and t.task_id != exclude_task and t.task_id not in best:
            if t.metadata.get("split") != "test":  # never show held-out tasks as examples
                best[t.task_id] = t
    if not best:
        return []
    want = _words(prompt or "")
    ranked = sorted(
        best.values(),
        key=lambda t: (-len(want & _words(t.metadata.get("task_prompt", ""))), -t.start),
    )
    # never a flagged trace (an ungrounded answer, one not reached through the tools...)
    clean = (
        t for t in ranked if not any(g.flags for g in store.grades(t.id) if g.source != "human")
    )
    return [store.get(t.id) for t in itertools.islice(clean, k)]


async def run_suite(
    cfg: Config,
    env: str | Environment,
    *,
    split: str = "test",
    limit: int | None = None,
    concurrency: int = 4,
    adapter: str | None = None,
    few_shot: int = 0,
    samples: int = 1,
    temperature: float | None = None,
    seed: int = 0,
    max_tokens: int | None = None,
    agent: Agent | None = None,
    judge_model: Any = None,
    tags: Sequence[str] = (),
    progress: bool = True,
    strict: bool = False,
    task_ids: set[str] | None = None,
    hints: bool = False,
    answer_shown: bool = False,
    perturb: str | None = None,
) -> SuiteResult:
    """Run `samples` episodes per task of `split` (first `limit` tasks), `concurrency` at once,
    grade each trace into the store, and summarise. Same seeds, same sampling for every
    adapter, so two runs differ only in the adapter.

    `hints`: append each task's hint (if it has one) to its prompt; for collection only. The
    trace records `hinted`, and training rows get the task's own prompt back.
    `answer_shown`: for tasks without a hint, show the reference answer and ask the model to
    reach it with the tools (STaR's rationalisation, agent.envs.bootstrap); for collection
    only. The trace records `hinted` and `conditioned: "answer"`; a right answer that did not
    come through the tools gets the flag `answer_not_from_tools`, so datasets drop it.
    `perturb`: ask each task as that perturbation writes it (agent.envs.perturb: typos, case,
    spacing, verbose, terse), seeded by `seed` and the task id; graded against the same answer."""
    environment = (
        env
        if isinstance(env, Environment)
        else load_environment(env, strict=strict, config=cfg.agent)
    )
    tasks = environment.split(split)[: limit or None]
    if task_ids is not None:
        tasks = [t for t in tasks if t.id in task_ids]
    if not tasks:
        raise ValueError(f"environment {environment.name!r} has no tasks in split {split!r}")
    run_id = uuid.uuid4().hex[:12]
    own_agent = agent is None
    agent = agent or Agent(cfg, adapter=adapter)
    await agent.start()
    store = agent.tracer.store
    extra = env_tools(cfg, environment)
    sampling: dict[str, Any] = {}
    if temperature is not None:
        sampling["temperature"] = temperature
    if max_tokens is not None:
        sampling["max_tokens"] = max_tokens
    sem = asyncio.Semaphore(max(1, concurrency))
    jobs = [(task, s) for task in tasks for s in range(samples)]
    started = time.perf_counter()

    async def one(task: Task, sample: int) -> EpisodeOutcome:
        async with sem:
            demos = demo_messages(
                environment, few_shot, store, exclude_task=task.id, prompt=task.prompt
            )
            hinted = bool(hints and task.hint)
            shown = bool(answer_shown and not hinted and task.answer is not None)
            prompt = perturb_prompt(task.prompt, perturb, seed, task.id) if perturb else task.prompt
            if hinted:
                prompt = f"{prompt}\n\nHint: {task.hint}"
            elif shown:
                prompt = answer_prompt(task.model_copy(update={"prompt": prompt}))
            res: RunResult = await agent.run(
                prompt,
                tools=task.tools if task.tools is not None else environment.tool_names,
                extra_tools=extra,
                subagents=environment.subagent_configs(),
                system_prompt=environment.system_prompt,
                demos=demos,
                env=environment.name,
                task_id=task.id,
                tags=[f"run:{run_id}", f"split:{split}", *tags],
                metadata={
                    "run_id": run_id,
                    "sample": sample,
                    "split": split,
                    "few_shot": few_shot,
                    "task_prompt": task.prompt,
                    "hinted": hinted or shown,  # the dataset puts task_prompt back
                    "conditioned": "hint" if hinted else "answer" if shown else None,
                    "perturb": perturb,
                    "task_answer": task.answer,
                    "task_grader": task.grader or environment.grader,
                },
                adapter=adapter,
                seed=seed + sample,
                **sampling,
            )
        trace = store.get(res.trace_id)
        t_grade = time.perf_counter()
        grade: Grade = await environment.agrade(task, trace, judge_model=judge_model)
        grade_s = time.perf_counter() - t_grade
        if shown and grade.value >= SUCCESS_THRESHOLD:
            why = through_tools(task, trace, task.tools or environment.tool_names)
            if why is not None:
                grade.flags.append(NOT_FROM_TOOLS)
                grade.metadata["not_from_tools"] = why
        store.add_grade(grade)
        tokens = sum(
            (s.llm.input_tokens or 0) + (s.llm.output_tokens or 0) for s in trace.spans if s.llm
        )
        return EpisodeOutcome(
            kind=task_kind(task),
            task_id=task.id,
            sample=sample,
            trace_id=res.trace_id,
            status=res.status,
            score=grade.value,
            success=grade.value >= SUCCESS_THRESHOLD and not grade.metadata.get("error"),
            flags=list(grade.flags),
            steps=res.steps,
            tokens=tokens,
            wall_s=res.latency_s,
            answer=res.answer,
            grade_error=grade.metadata.get("error"),
            grade_s=grade_s,
        )

    try:
        # inside the try: an unknown adapter must still close the agent we opened, or its
        # checkpoint connection's thread keeps the process from exiting
        adapter_name = (
            agent.resolve_adapter(adapter) if adapter is not None else agent.current_adapter()
        )
        outcomes = await _gather_with_progress(
            [one(t, s) for t, s in jobs], progress, f"{environment.name}/{split}"
        )
    finally:
        if own_agent:
            await agent.aclose()
    n = len(outcomes)
    wins = sum(o.success for o in outcomes)
    return SuiteResult(
        env=environment.name,
        split=split,
        run_id=run_id,
        adapter=adapter_name,
        n=n,
        successes=wins,
        success_rate=wins / n,
        ci95=wilson_interval(wins, n),
        mean_steps=sum(o.steps for o in outcomes) / n,
        mean_tokens=sum(o.tokens for o in outcomes) / n,
        mean_wall_s=sum(o.wall_s for o in outcomes) / n,
        flag_rate=sum(bool(o.flags) for o in outcomes) / n,
        wall_s=time.perf_counter() - started,
        few_shot=few_shot,
        samples=samples,
        temperature=temperature,
        seed=seed,
        perturb=perturb,
        outcomes=sorted(outcomes, key=lambda o: (o.task_id, o.sample)),
    )


async def _gather_with_progress(coros: list, show: bool, label: str) -> list:
    if not show:
        return list(await asyncio.gather(*coros))
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=Console(stderr=True), transient=False,
    ) as bar:  # fmt: skip
        task = bar.add_task(label, total=len(coros))

        async def tick(c):
            r = await c
            bar.advance(task)
            return r

        return list(await asyncio.gather(*(tick(c) for c in coros)))


async def run_robustness(
    cfg: Config, env: str, perturbations: Sequence[str], **options: Any
) -> dict[str, SuiteResult]:
    """The same tasks, seeds and sampling clean and under each perturbation: {"clean": ...,
    "typos": ...}. The gap to "clean" is how much messy typing costs the model."""
    results = {"clean": await run_suite(cfg, env, **options)}
    for name in perturbations:
        results[name] = await run_suite(cfg, env, perturb=name, **options)
    return results
