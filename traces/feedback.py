"""Human feedback: a thumbs up or down on a trace, one at a time or in a review session.

Feedback is a Grade like any other, with source `human`, so dataset builders and the eval
gate treat it the same way (and a thumbs down always overrides a passing verifier).
"""

from __future__ import annotations

import getpass
from typing import Any

from tools.errors import SelftuneError
from traces.schemas import Grade, TraceQuery
from traces.store import TraceStore


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
