"""Graders: turn a trace's final answer into a score in [0, 1] with a reason.

Rule graders (source "verifier"), reading the answer with `traces.read`:
- `exact`: the answer equals the reference after normalising (see `normalize_text`): case,
  Unicode width, punctuation, whitespace, the articles a/an/the, and a leading answer marker
  ("the answer is", "answer:", "final answer:"). A list reference accepts any of its items.
- `numeric`: the number the answer gives (see `answer_number`) equals the reference within a
  relative tolerance (`task.metadata["rel_tol"]`, default 1e-6) or an absolute one
  (`task.metadata["abs_tol"]`, default 1e-9).
- `contains`: each reference string occurs in the answer, case-insensitively and with
  whitespace collapsed. A list reference needs all items; the score is the fraction found.
- `regex`: the reference pattern (or each of a list) matches somewhere in the answer,
  case-insensitively unless `task.metadata["regex_case_sensitive"]` is true.
- `module:function`: any importable callable `fn(task, answer, trace)` returning a float, a
  `(float, reason)` pair or a `GradeResult`.
- `judge` (source "judge"): the LLM judge of `traces.judge`; `agrade_group` judges N traces of
  one task together.

`grade_trace` / `agrade_trace` build the stored `traces.schemas.Grade` with the reward-hacking
flags of `traces.flags`. Its `grader` field is the grader's name ("numeric", "judge",
"mypkg.graders:fn", "env:<environment>"), so re-grading with the same grader replaces the grade.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import math
import re
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any

from traces.flags import compute_flags
from traces.judge import judge_group, judge_pointwise
from traces.read import answer_number, clip, final_answer, find_numbers, normalize_text
from traces.schemas import Grade, GraderError, GradeResult, Task, Trace

RULE_GRADERS = ("exact", "numeric", "contains", "regex")
BUILTIN_GRADERS = (*RULE_GRADERS, "judge")
ENV_GRADER = "env"  # the environment's own grade function (environment.py)


def as_number(value: Any) -> float:
    """A reference answer as a float (a number, or a string holding one); GraderError if not."""
    if isinstance(value, bool):
        raise GraderError(f"reference answer {value!r} is a boolean, not a number")
    if isinstance(value, int | float):
        return float(value)
    found = answer_number(str(value))
    if found is None:
        raise GraderError(f"reference answer {value!r} holds no number: give a number")
    return found


# --- rule graders ----------------------------------------------------------------------------


def _refs(reference: Any) -> list[Any]:
    return list(reference) if isinstance(reference, list | tuple) else [reference]


def grade_exact(answer: str, reference: Any, metadata: dict | None = None) -> GradeResult:
    """1.0 when the normalised answer equals the normalised reference (or any of a list)."""
    if reference is None:
        return GradeResult.failed("task has no 'answer' to compare with: add one or use the judge")
    got = normalize_text(answer)
    for ref in _refs(reference):
        if got == normalize_text(str(ref)):
            return GradeResult(1.0, f"matches {ref!r}")
    return GradeResult(0.0, f"{clip(answer)!r} does not match {reference!r}")


def grade_numeric(answer: str, reference: Any, metadata: dict | None = None) -> GradeResult:
    """1.0 when the answer's number (see `traces.read.answer_number`) equals the reference within tolerance.

    metadata: `rel_tol` (default 1e-6), `abs_tol` (default 1e-9), `number` ("auto", "first",
    "last", or "any": any number in the answer may match; lenient, rewards listing numbers),
    `unit` (a regex; in "auto" mode the number right before it wins, see `answer_number`).
    """
    metadata = metadata or {}
    if reference is None:
        return GradeResult.failed("task has no 'answer' to compare with: add a number")
    try:
        refs = [as_number(r) for r in _refs(reference)]
    except GraderError as e:
        return GradeResult.failed(str(e))
    rel_tol = float(metadata.get("rel_tol", 1e-6))
    abs_tol = float(metadata.get("abs_tol", 1e-9))
    mode = metadata.get("number", "auto")
    if mode == "any":
        candidates = [n[0] for n in find_numbers(answer)]
    else:
        try:
            got = answer_number(answer, mode, metadata.get("unit"))
        except GraderError as e:
            return GradeResult.failed(str(e))
        candidates = [] if got is None else [got]
    if not candidates:
        return GradeResult(0.0, f"no number in the answer {clip(answer)!r}")
    for got in candidates:
        for ref in refs:
            if math.isclose(got, ref, rel_tol=rel_tol, abs_tol=abs_tol):
                return GradeResult(1.0, f"{_fmt(got)} equals {_fmt(ref)}")
    shown = ", ".join(_fmt(c) for c in candidates)
    return GradeResult(0.0, f"answer gives {shown}, expected {' or '.join(map(_fmt, refs))}")


def grade_contains(answer: str, reference: Any, metadata: dict | None = None) -> GradeResult:
    """Fraction of the reference strings found in the answer (case-insensitive)."""
    if reference is None:
        return GradeResult.failed(
            "task has no 'answer' to look for: add a string or a list of strings"
        )
    got = " ".join(unicodedata.normalize("NFKC", answer).lower().split())
    refs = [str(r) for r in _refs(reference)]
    missing = [r for r in refs if " ".join(r.lower().split()) not in got]
    score = (len(refs) - len(missing)) / len(refs)
    if not missing:
        return GradeResult(1.0, f"contains {', '.join(map(repr, refs))}")
    return GradeResult(score, f"missing {', '.join(map(repr, missing))}")


def grade_regex(answer: str, reference: Any, metadata: dict | None = None) -> GradeResult:
    """Fraction of the reference patterns that match somewhere in the answer."""
    metadata = metadata or {}
    if reference is None:
        return GradeResult.failed("task has no 'answer' pattern: add a regular expression")
    flags = 0 if metadata.get("regex_case_sensitive") else re.IGNORECASE
    patterns = [str(r) for r in _refs(reference)]
    missing = []
    for p in patterns:
        try:
            if not re.search(p, answer, flags):
                missing.append(p)
        except re.error as e:
            return GradeResult.failed(
                f"reference pattern {p!r} is not a valid regular expression: {e}"
            )
    if not missing:
        return GradeResult(1.0, f"matches {', '.join(map(repr, patterns))}")
    return GradeResult(
        (len(patterns) - len(missing)) / len(patterns), f"no match for {', '.join(missing)}"
    )


_RULES: dict[str, Callable[[str, Any, dict | None], GradeResult]] = {
    "exact": grade_exact,
    "numeric": grade_numeric,
    "contains": grade_contains,
    "regex": grade_regex,
}


def rule(name: str | None) -> Callable[[str, Any, dict | None], GradeResult] | None:
    """The rule grader called `name` ("exact", "numeric", "contains", "regex"), else None."""
    return _RULES.get(name or "")


# --- custom graders --------------------------------------------------------------------------


def check_grader_name(name: str) -> None:
    """Raise GraderError unless `name` is a built-in grader, "env" or a `module:function` path."""
    if name in BUILTIN_GRADERS or name == ENV_GRADER:
        return
    module, sep, func = name.partition(":")
    if not sep or not module or not func.isidentifier():
        raise GraderError(
            f"unknown grader {name!r}: use one of {', '.join(BUILTIN_GRADERS)} "
            "or a Python path like 'mypkg.graders:my_grader'"
        )


def load_callable(path: str) -> Callable:
    """Import `module:function`. Raises GraderError naming what is missing."""
    check_grader_name(path)
    module_name, _, func_name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise GraderError(f"grader {path!r}: cannot import {module_name!r} ({e})") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise GraderError(f"grader {path!r}: module {module_name!r} has no function {func_name!r}")
    return fn


def to_result(value: Any, where: str) -> GradeResult:
    """A custom grader's return value (float, (float, reason) or GradeResult) as a GradeResult."""
    if isinstance(value, GradeResult):
        return value
    reason = ""
    if isinstance(value, tuple) and len(value) == 2:
        value, reason = value
    if isinstance(value, bool) or not isinstance(value, int | float):
        return GradeResult.failed(
            f"{where} returned {value!r}: return a float in [0, 1] or (float, reason)"
        )
    if not 0.0 <= float(value) <= 1.0:
        return GradeResult.failed(f"{where} returned {value!r}, outside [0, 1]")
    return GradeResult(float(value), str(reason) or f"{where} gave {float(value):g}")


async def _call_custom(fn: Callable, where: str, task: Task, answer: str, trace: Trace):
    try:
        value = fn(task, answer, trace)
        if inspect.isawaitable(value):
            value = await value
    except Exception as e:  # noqa: BLE001 - a user's grader may raise anything; report it
        return GradeResult.failed(f"{where} raised {type(e).__name__}: {e}")
    return to_result(value, where)


# --- grading a trace into a Grade record -----------------------------------------------------


def resolve_grader_name(task: Task, grader_name: str | None, env_grader: Any) -> str:
    """Which grader applies: the explicit one, else the task's, else the environment's function
    ("env"), else "exact" when the task has an answer, else "judge"."""
    name = grader_name or task.grader
    if name is None:
        name = (
            ENV_GRADER
            if env_grader is not None
            else ("exact" if task.answer is not None else "judge")
        )
    check_grader_name(name)
    return name


def _grade_record(
    task: Task, trace: Trace, name: str, result: GradeResult, flag_kwargs: dict[str, Any]
) -> Grade:
    if name == ENV_GRADER:
        stored, source = f"env:{trace.env}" if trace.env else "env", "verifier"
    else:
        stored, source = name, "judge" if name == "judge" else "verifier"
    flags = list(result.flags)
    if result.error is None:
        for f in compute_flags(task, trace, result, judged=source == "judge", **flag_kwargs):
            if f not in flags:
                flags.append(f)
    metadata: dict[str, Any] = {"task_id": task.id}
    if result.error is not None:
        metadata["error"] = result.error
    return Grade(
        trace_id=trace.id,
        value=result.score,
        source=source,
        grader=stored,
        reason=result.reason,
        flags=flags,
        raw=result.raw,
        metadata=metadata,
    )


async def agrade_trace(
    task: Task,
    trace: Trace,
    grader_name: str | None = None,
    *,
    judge_model: Any = None,
    env_grader: Callable | None = None,
    rubric: str | None = None,
    demos: Sequence[dict] = (),
    requires_tools: Sequence[str] = (),
) -> Grade:
    """Grade one trace into a `Grade` record with reward-hacking flags (async; any grader).

    `grader_name` overrides the task's grader; `env_grader` is the environment's own
    `grade(task, answer, trace)`; `rubric` the judge rubric (else `task.metadata["rubric"]`);
    `demos` and `requires_tools` feed the flags (see `traces.flags`). Grading failures (judge
    junk, a crashing custom grader) come back as a Grade with value 0.0 and
    `metadata["error"]`, never as an exception. Raises GraderError only for a grader name that
    cannot exist or a judge grader without `judge_model`.
    """
    name = resolve_grader_name(task, grader_name, env_grader)
    answer = final_answer(trace)
    if name in _RULES:
        result = _RULES[name](answer, task.answer, task.metadata)
    elif name == "judge":
        if judge_model is None:
            raise GraderError("grader 'judge' needs a judge model: pass judge_model=")
        result = await judge_pointwise(
            judge_model, task, trace, rubric or task.metadata.get("rubric")
        )
    elif name == ENV_GRADER:
        if env_grader is None:
            raise GraderError("grader 'env' needs the environment's grade function: env_grader=")
        result = await _call_custom(env_grader, "environment grader", task, answer, trace)
    else:
        try:
            fn = load_callable(name)
        except GraderError as e:
            result = GradeResult.failed(str(e))
        else:
            result = await _call_custom(fn, f"grader {name!r}", task, answer, trace)
    kwargs = {"demos": demos, "requires_tools": requires_tools}
    return _grade_record(task, trace, name, result, kwargs)


def grade_trace(
    task: Task,
    trace: Trace,
    grader_name: str | None = None,
    *,
    judge_model: Any = None,
    env_grader: Callable | None = None,
    rubric: str | None = None,
    demos: Sequence[dict] = (),
    requires_tools: Sequence[str] = (),
) -> Grade:
    """`agrade_trace` for callers without an event loop. Inside a running loop (the agent,
    async tests), await `agrade_trace` instead."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise GraderError("grade_trace was called inside a running event loop: await agrade_trace")
    return asyncio.run(
        agrade_trace(
            task,
            trace,
            grader_name,
            judge_model=judge_model,
            env_grader=env_grader,
            rubric=rubric,
            demos=demos,
            requires_tools=requires_tools,
        )
    )


async def agrade_group(
    task: Task,
    traces: Sequence[Trace],
    judge_model: Any,
    *,
    rubric: str | None = None,
    demos: Sequence[dict] = (),
    requires_tools: Sequence[str] = (),
) -> list[Grade]:
    """Judge N traces of one task together (RULER-style) into one `Grade` each, grader
    "judge-group", with flags."""
    results = await judge_group(judge_model, task, traces, rubric or task.metadata.get("rubric"))
    kwargs = {"demos": demos, "requires_tools": requires_tools}
    grades = []
    for trace, result in zip(traces, results, strict=True):
        grade = _grade_record(task, trace, "judge", result, kwargs)
        grades.append(grade.model_copy(update={"grader": "judge-group"}))
    return grades


def _fmt(x: float) -> str:
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)
