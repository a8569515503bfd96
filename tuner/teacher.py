"""The teacher: a stronger model plays the train tasks the student failed (distillation).

    [teacher]
    base_url = "http://127.0.0.1:8001/v1"   # any OpenAI-compatible server
    model = "calc"                           # the name it serves (default: the first listed)
    api_key_env = "TEACHER_API_KEY"          # the variable's NAME; the key stays in the env

The teacher runs as the agent's model and nothing else changes: the same tools, retrieval,
subagents, system prompt and grader. Its episodes are ordinary traces, graded like the
student's, tagged `teacher` and `source:teacher`, so the dataset builder keeps the passing
ones as training rows and its manifest counts them (`counts.by_source`, `teacher_rows`).
This is the usual real setting: the production agent runs on a strong model, and a small
local model learns to replace it.

The teacher can also be the LLM judge (`[improve] judge = "teacher"`, `[tuner.grpo] judge`):
`make_judge` builds either judge, the teacher's on the same `teacher_config` its episodes run
on, and names it in the grades it gives.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rich.console import Console

from agent.config import NO_TEACHER_JUDGE, Config, Judge, TeacherConfig
from tools.errors import SelftuneError

if TYPE_CHECKING:
    from agent.envs import Environment

TEACHER_TAGS = ("teacher", "source:teacher")


class TeacherError(SelftuneError, RuntimeError):
    """The teacher cannot be used; the message names the `[teacher]` key and the fix."""


def describe(t: TeacherConfig) -> str:
    """The teacher in a few words, for logs and job states (never the key)."""
    if t.base_url:
        return f"{t.model or 'first served model'} at {t.base_url}"
    if t.model:
        return f"model {t.model}" + (f" with adapter {t.adapter}" if t.adapter else "")
    return f"adapter {t.adapter} on the student's base model"


async def served_model(t: TeacherConfig) -> str:
    """Check that the teacher's server answers, accepts the key and serves `model`; returns
    the model name to ask for. Raises TeacherError naming `[teacher] base_url` and the fix."""
    import httpx

    assert t.base_url
    key = os.environ.get(t.api_key_env)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = t.base_url.rstrip("/") + "/models"
    try:
        async with httpx.AsyncClient(timeout=t.timeout_s) as client:
            r = await client.get(url, headers=headers)
    except httpx.HTTPError as e:
        raise TeacherError(
            f"[teacher] base_url = {t.base_url!r} does not answer ({type(e).__name__}: {e}): start "
            "the teacher's server (e.g. `selftune serve --port 8001`), correct [teacher] base_url, "
            "or remove the [teacher] section to collect without a teacher"
        ) from None
    if r.status_code in (401, 403):
        raise TeacherError(
            f"the teacher at [teacher] base_url = {t.base_url!r} refused the key (HTTP "
            f"{r.status_code}): export a valid key in ${t.api_key_env}, or set [teacher] "
            "api_key_env to the variable that holds it"
        )
    if r.status_code >= 400:
        raise TeacherError(
            f"the teacher at [teacher] base_url = {t.base_url!r} answered HTTP {r.status_code} "
            "on GET /models: is it an OpenAI-compatible API root (usually ending in /v1)?"
        )
    try:
        served = [m["id"] for m in r.json().get("data", [])]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise TeacherError(
            f"[teacher] base_url = {t.base_url!r} did not answer GET /models with an OpenAI "
            "model list: point it at an OpenAI-compatible API root (usually ending in /v1)"
        ) from None
    if t.model and served and t.model not in served:
        raise TeacherError(
            f"[teacher] model = {t.model!r} is not served at {t.base_url}: it serves "
            f"{', '.join(served)}; set [teacher] model to one of them"
        )
    if not t.model and not served:
        raise TeacherError(
            f"the teacher at {t.base_url} lists no models: set [teacher] model to the name it serves"
        )
    return t.model or served[0]


async def teacher_config(cfg: Config) -> Config:
    """The config whose `[model]` is the teacher (the rest, tools and workspace included, is
    the student's): what the teacher's agent runs on."""
    t = cfg.teacher
    if not t.configured:
        raise TeacherError(
            "no teacher is configured: set [teacher] base_url (an OpenAI-compatible server), "
            "model (a model folder) or adapter (a registry version)"
        )
    if t.base_url:
        name = await served_model(t)
        model = cfg.model.updated(
            backend="openai", base_url=t.base_url, name=name, api_key_env=t.api_key_env
        )
        model = model.updated(adapter="base")  # the served name is the whole choice
    elif t.model:
        model = cfg.model.updated(backend="local", name=t.model, adapter=t.adapter or "base")
    else:  # one of our own adapters, on whatever serves the student
        model = cfg.model.updated(adapter=t.adapter)
    return cfg.model_copy(update={"model": model})


@dataclass(frozen=True)
class JudgeModel:
    """An LLM judge ready to grade: its chat model and who it is, as its grades name it."""

    model: Any  # a LangChain chat model
    grader: str  # the grades' `grader`: "judge:base:smollm2-135m-instruct", "judge:teacher:gpt-4o"
    description: str  # for logs and job states (never a key)

    @property
    def group_grader(self) -> str:
        """The name of its RULER-style group grades: "judge-group:teacher:gpt-4o"."""
        return "judge-group" + self.grader.removeprefix("judge")


async def make_judge(cfg: Config, which: Judge, *, max_tokens: int = 128) -> JudgeModel:
    """The judge `which` names: "base", the configured base model with no adapter
    (agent.workspace.judge_model); "teacher", the `[teacher]` model, built as its episodes are
    (`teacher_config`: the server is checked to answer and serve the model). Raises
    TeacherError when "teacher" is asked for with no `[teacher]`, or it cannot be reached."""
    from agent.workspace import judge_model

    if which == "base":
        name = cfg.model.name
        return JudgeModel(
            judge_model(cfg, max_tokens=max_tokens), f"judge:base:{name}", f"base model {name}"
        )
    if which != "teacher":
        raise TeacherError(f"unknown judge {which!r}: choose 'base' or 'teacher'")
    if not cfg.teacher.configured:
        raise TeacherError(f"judge 'teacher': {NO_TEACHER_JUDGE}")
    tcfg = await teacher_config(cfg)
    adapter = None if tcfg.model.adapter == "base" else tcfg.model.adapter
    name = tcfg.model.name + (f"+{adapter}" if adapter else "")
    model = judge_model(tcfg, max_tokens=max_tokens, adapter=adapter)
    return JudgeModel(model, f"judge:teacher:{name}", f"teacher {describe(cfg.teacher)}")


async def teacher_wave(
    cfg: Config,
    env: str | Environment,
    task_ids: set[str] | list[str],
    *,
    seed: int,
    tags: list[str],
    console: Console,
) -> dict[str, Any]:
    """Play `task_ids` (train tasks of `env`, usually those the student failed) with the
    teacher as the agent's model; each episode is graded and stored as a trace tagged
    `teacher` and `source:teacher`. Returns the wave's counts: {"kind": "teacher", "teacher",
    "n", "successes", "kept" (right and unflagged), "solved": [task ids]}."""
    from agent.agent import Agent
    from agent.envs.run import run_suite

    t = cfg.teacher
    stats: dict[str, Any] = {"kind": "teacher", "teacher": describe(t), "n": 0, "successes": 0}
    stats["solved"] = []
    if not task_ids:
        return stats
    tcfg = await teacher_config(cfg)
    name = env if isinstance(env, str) else env.name
    console.print(
        f"[bold]collect[/bold] {name} teacher wave: {len(task_ids)} train tasks the student "
        f"failed, teacher {describe(t)}, few-shot {t.few_shot}"
    )
    agent = Agent(tcfg, checkpoints=False)
    try:
        res = await run_suite(
            tcfg,
            env,
            split="train",
            task_ids=set(task_ids),
            concurrency=t.concurrency,
            adapter=tcfg.model.adapter,
            few_shot=t.few_shot,
            temperature=t.temperature,
            seed=seed,
            max_tokens=t.max_tokens or cfg.improve.max_tokens,
            agent=agent,
            tags=[*tags, *TEACHER_TAGS],
            progress=True,
        )
    finally:
        await agent.aclose()
    errors = [o for o in res.outcomes if o.status == "error"]
    if errors and len(errors) == res.n:  # every episode failed on the backend: say why
        trace = agent.tracer.store.get(errors[0].trace_id)
        raise TeacherError(
            f"every teacher episode failed ({trace.error if trace else 'no trace'}): check the "
            f"[teacher] section ({describe(t)})"
        )
    # as for the student: only right, unflagged episodes reach the dataset
    kept = [o for o in res.outcomes if o.success and not o.flags]
    stats.update(
        n=res.n,
        successes=res.successes,
        kept=len(kept),
        solved=sorted({o.task_id for o in kept}),
    )
    console.print(
        f"teacher solved {len(stats['solved'])} of {len(set(task_ids))} tasks "
        f"({res.successes}/{res.n} episodes)"
    )
    return stats
