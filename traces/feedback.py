"""Human feedback: a thumbs up or down, a score or a correction on a trace, one at a time (the
CLI, `POST /v1/feedback`: both through `give_feedback`) or in a review session, and the datasets
made from it; and marking a session private after the fact.

Feedback is a Grade like any other, with source `human`, so dataset builders and the eval
gate treat it the same way (and a thumbs down always overrides a passing verifier). A
correction is kept in the grade's metadata; `feedback_rows` turns it into SFT rows, DPO pairs
(correction chosen, original rejected) and KTO labels, each row with its provenance.
"""

from __future__ import annotations

import getpass
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.errors import SelftuneError
from traces.datasets import (
    Built,
    DatasetError,
    DatasetFilters,
    DatasetResult,
    human_grade,
    split_at_divergence,
    write_dataset,
)
from traces.read import training_conversation
from traces.schemas import Grade, Trace, TraceQuery
from traces.store import TraceStore
from traces.times import parse_time


def _who(who: str | None) -> str:
    try:
        return who or getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in some containers
        return "anonymous"


class FeedbackError(SelftuneError, ValueError):
    """Feedback that says nothing usable (no thumb, score or correction; a score outside [0, 1])."""


def record_feedback(
    store: TraceStore,
    trace_id: str,
    up: bool | None,
    *,
    note: str | None = None,
    who: str | None = None,
    score: float | None = None,
    correction: str | None = None,
    via: str = "cli",
) -> Grade:
    """Store a human grade on the trace with this id or unique prefix.

    Its value is 1.0 for up and 0.0 for down; with no thumb, `score` (in [0, 1]); with neither,
    a `correction` alone counts as down (the answer needed correcting). A correction is the
    answer the person wanted; it is kept in the grade's metadata with the score and `via` (where
    the feedback came from: cli, http). One per person and trace: giving feedback again replaces
    the earlier one. Raises TraceNotFoundError for an unknown id.
    """
    if score is not None and not 0.0 <= float(score) <= 1.0:  # NaN fails this too
        raise FeedbackError(f"score {score!r} is outside [0, 1]: give a number from 0 to 1")
    if up is None and score is None and correction is None:
        raise FeedbackError("feedback needs a thumb (up/down), a score or a correction")
    full_id = store.resolve_id(trace_id)
    value = (1.0 if up else 0.0) if up is not None else float(score) if score is not None else 0.0
    thumb = None if up is None else ("up" if up else "down")
    metadata: dict[str, Any] = {"via": via}
    if thumb is not None:
        metadata["thumb"] = thumb
    if score is not None:
        metadata["score"] = float(score)
    if correction is not None:
        metadata["correction"] = correction
    grade = Grade(
        trace_id=full_id,
        value=value,
        source="human",
        grader=f"human:{_who(who)}",
        reason=note or (f"thumbs {thumb}" if thumb else "corrected" if correction else "scored"),
        metadata=metadata,
    )
    return store.add_grade(grade)


@dataclass
class FeedbackGiven:
    """What `give_feedback` did: the trace (full id) and its session; the grade it stored, if a
    verdict was given; the traces it marked private, if asked."""

    trace_id: str
    session: str
    grade: Grade | None = None
    marked: list[str] = field(default_factory=list)


def give_feedback(
    store: TraceStore,
    trace_id: str,
    up: bool | None = None,
    *,
    score: float | None = None,
    note: str | None = None,
    correction: str | None = None,
    private: bool = False,
    who: str | None = None,
    via: str = "cli",
) -> FeedbackGiven:
    """A person's feedback on the trace with this id (or unique prefix), as `POST
    /v1/feedback` and `selftune feedback` take it: a verdict (thumb, score, correction:
    `record_feedback`), `private` (the trace's whole session stays out of training:
    `mark_private`), or both. The session is marked first, so a verdict that fails cannot leave
    it trainable. Raises FeedbackError when nothing is given or the score is out of range,
    TraceNotFoundError for an unknown id."""
    verdict = up is not None or score is not None or correction is not None
    if not verdict and not private:
        raise FeedbackError("feedback needs a thumb (up/down), a score, a correction or private")
    if score is not None and not 0.0 <= float(score) <= 1.0:  # before anything is marked
        raise FeedbackError(f"score {score!r} is outside [0, 1]: give a number from 0 to 1")
    trace = store.get(trace_id, with_spans=False)
    given = FeedbackGiven(trace.id, session_of(trace))
    if private:
        given.marked = mark_private(store, trace.id, who=who, via=via)
    if verdict:
        given.grade = record_feedback(
            store, trace.id, up, note=note, who=who, score=score, correction=correction, via=via
        )
    return given


def _has_human_grade(store: TraceStore, trace_id: str) -> bool:
    return any(g.source == "human" for g in store.grades(trace_id))


def review_loop(
    store: TraceStore,
    *,
    env: str | None = None,
    ungraded: bool = False,
    limit: int = 50,
    who: str | None = None,
    console: Any = None,
    getkey=None,
    ask=None,
) -> dict[str, int]:
    """Show traces newest first, one at a time, and take a single key for each:
    u (up), d (down), s (skip), n (add a note, then u/d), q (quit). Returns the counts."""
    import click
    from rich.console import Console

    from traces.render import trace_tree

    console = console or Console()
    getkey = getkey or click.getchar
    ask = ask or (lambda prompt: click.prompt(prompt, default="", show_default=False))
    counts = {"up": 0, "down": 0, "skip": 0}
    traces = store.query(TraceQuery(env=env, limit=None if ungraded else limit))
    shown = 0
    for summary in traces:
        if shown >= limit:
            break
        if ungraded and _has_human_grade(store, summary.id):
            continue
        shown += 1
        trace = store.get(summary.id)
        console.print(trace_tree(trace, store.grades(trace.id)))
        note: str | None = None
        while True:
            console.print("[bold][u][/bold]p  [bold][d][/bold]own  [bold][s][/bold]kip  "
                          "[bold][n][/bold]ote  [bold][q][/bold]uit ? ", end="")  # fmt: skip
            key = (getkey() or "").lower()
            console.print(key)
            if key == "n":
                note = ask("note") or None
                continue
            if key in ("u", "d"):
                record_feedback(store, trace.id, key == "u", note=note, who=who)
                counts["up" if key == "u" else "down"] += 1
                break
            if key == "s":
                counts["skip"] += 1
                break
            if key == "q":
                return counts
    return counts


# --- datasets from feedback ------------------------------------------------------------------

FEEDBACK_KINDS: tuple[str, ...] = ("sft", "dpo", "kto")
# JSON, not JSONL: trainers read every *.jsonl of a dataset folder as rows
PROVENANCE_FILE = "provenance.json"


def session_of(trace: Trace) -> str:
    """The session a trace belongs to (its own id when the request named none)."""
    return str(trace.metadata.get("session_id") or trace.id)


def is_private(trace: Trace) -> bool:
    """Whether the person asked for this trace to stay out of training: `metadata.private`
    (the server sets it for the `X-Selftune-Private` header, `mark_private` after the fact) or
    `private` in the request's metadata."""
    asked = trace.metadata.get("request_metadata") or {}
    return bool(trace.metadata.get("private") or (isinstance(asked, dict) and asked.get("private")))


def private_sessions(traces: Iterable[Trace]) -> set[str]:
    """The sessions with a private trace among `traces`: all of such a session stays out."""
    return {session_of(t) for t in traces if is_private(t)}


def mark_private(
    store: TraceStore, trace_id: str, *, who: str | None = None, via: str = "cli"
) -> list[str]:
    """Mark the session of the trace with this id (or unique prefix) private after the fact:
    every trace of it recorded so far gets `metadata.private` (and who marked it, when, how),
    so traffic datasets and `improve --source traffic` leave the session out. Returns the
    marked trace ids. Raises TraceNotFoundError for an unknown id."""
    import time

    mark = {"private": True, "private_marked": {"by": _who(who), "when": time.time(), "via": via}}
    return store.mark_session(trace_id, mark)


def row_provenance(trace: Trace, grade: Grade, signal: str) -> dict[str, Any]:
    """Where a row came from: which trace, which feedback, from whom, when, how it arrived."""
    return {
        "trace_id": trace.id,
        "grade_id": grade.id,
        "signal": signal,  # thumb_up | thumb_down | correction | corrected_original
        "who": grade.grader.removeprefix("human:"),
        "when": grade.created,
        "via": grade.metadata.get("via"),
        "session_id": trace.metadata.get("session_id"),
    }


def _rows_for(
    kind: str,
    messages: list[dict[str, Any]],
    first: int,
    corrected: list[dict[str, Any]] | None,
    up: bool,
    ok: bool,
) -> tuple[list[tuple[str, dict[str, Any], bool | None]], str | None]:
    """The (signal, row, label) triples one trace's feedback makes, or why it makes none."""
    if kind == "sft":
        if corrected is not None:
            return [("correction", {"messages": corrected, "subagent": None}, None)], None
        if up and ok:
            return [("thumb_up", {"messages": messages, "subagent": None}, None)], None
        return [], "thumbs_down" if not up else "status_not_ok"
    if kind == "dpo":
        if corrected is None:
            return [], "no_correction"
        split = split_at_divergence(corrected, messages)
        if split is None:
            return [], "correction_equals_answer"
        prompt, chosen, rejected = split
        return [
            ("correction", {"prompt": prompt, "chosen": chosen, "rejected": rejected}, None)
        ], None
    signal = "thumb_up" if up else "corrected_original" if corrected else "thumb_down"
    rows = [(signal, {"prompt": messages[:first], "completion": messages[first:], "label": up}, up)]
    if corrected is not None:
        row = {"prompt": corrected[:first], "completion": corrected[first:], "label": True}
        rows.append(("correction", row, True))
    return rows, None


def feedback_rows(
    kind: str, traces: Iterable[Trace], grades: Mapping[str, Sequence[Grade]]
) -> Built:
    """Training rows from people's feedback on traces (with spans); each row's `row_info` has
    its provenance under "feedback".

    - sft: a thumbs-up conversation as it was; a corrected one with its final answer replaced
      by the correction.
    - dpo: one pair per correction: the correction chosen, the original answer rejected.
    - kto: each thumb labels its conversation; a correction labels the original False and adds
      the corrected conversation as True.

    The latest human grade of a trace counts. Traces of a session with a private trace among
    `traces` (`metadata.private`, or `private` in the request's metadata) and test-split
    traces are left out.
    """
    if kind not in FEEDBACK_KINDS:
        raise DatasetError(f"unknown kind {kind!r} for feedback rows: choose sft, dpo or kto")
    excluded: Counter[str] = Counter()
    entries: list[tuple[tuple, dict[str, Any], dict[str, Any]]] = []
    traces = list(traces)
    private = private_sessions(traces)
    for t in sorted(traces, key=lambda t: t.id):
        g = human_grade(grades.get(t.id, ()))
        if g is None:
            excluded["no_human_feedback"] += 1
            continue
        if session_of(t) in private:
            excluded["private"] += 1
            continue
        if t.metadata.get("split") == "test":
            excluded["test_split"] += 1
            continue
        messages, tools = training_conversation(t)
        first = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), None)
        if first is None or first == 0 or messages[-1].get("role") != "assistant":
            excluded["no_llm_call"] += 1
            continue
        correction = g.metadata.get("correction")
        corrected = (
            messages[:-1] + [{"role": "assistant", "content": correction}] if correction else None
        )
        up = g.value >= 0.5 and correction is None
        made, reason = _rows_for(kind, messages, first, corrected, up, t.status == "ok")
        if reason:
            excluded[reason] += 1
        for n, (signal, row, label) in enumerate(made):
            info = {
                "env": t.env,
                "task_id": t.task_id,
                "trace_ids": [t.id],
                "grade_ids": (g.id,),
                "label": label,
                "subagent": None,
                "feedback": row_provenance(t, g, signal),
            }
            entries.append(((t.id, n), {**row, "tools": tools}, info))
    entries.sort(key=lambda e: e[0])
    info = [e[2] for e in entries]
    return Built(
        kind,
        [e[1] for e in entries],
        info,
        sorted({tid for i in info for tid in i["trace_ids"]}),
        sorted({gid for i in info for gid in i["grade_ids"]}),
        dict(sorted(excluded.items())),
    )


def build_feedback_dataset(
    store: TraceStore,
    kind: str,
    out: str | Path,
    *,
    since: float | str | None = None,
    tag: str | None = "traffic",
    scrub_patterns: Sequence[str] = (),
) -> DatasetResult:
    """Build a `kind` dataset from the traces with people's feedback (by default those the
    server recorded, tag `traffic`) and write it to `out` like every dataset (scrubbed, with a
    manifest), plus `provenance.json`: for each row of train.jsonl, in order, the trace, the
    feedback, who gave it and when. Raises DatasetError when no row qualifies."""
    filters = DatasetFilters(since=since)  # checks --since
    q = TraceQuery(tag=tag, since=None if since is None else parse_time(since), limit=None)
    traces = store.query(q, with_spans=True)
    grades = {t.id: store.grades(t.id) for t in traces}
    built = feedback_rows(kind, traces, grades)
    if not built.rows:
        why = ", ".join(f"{r}: {n}" for r, n in built.excluded.items()) or "no traces matched"
        raise DatasetError(
            f"no {kind} rows from {len(traces)} traces{f' tagged {tag!r}' if tag else ''} ({why}): "
            "give feedback with POST /v1/feedback or `selftune feedback`"
            + (" (dpo needs corrections)" if kind == "dpo" else "")
        )
    result = write_dataset(built, out, filters, scrub_patterns=scrub_patterns)
    rows = [i["feedback"] for i in built.row_info]
    text = json.dumps(rows, indent=1, ensure_ascii=False) + "\n"
    (result.path / PROVENANCE_FILE).write_text(text, encoding="utf-8")
    return result
