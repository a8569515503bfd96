"""Terminal rendering of traces with rich: a list table, a span tree, a stats table."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from traces.schemas import Grade, Span, Trace, TraceStats

_STATUS_STYLE = {"ok": "green", "running": "yellow", "error": "red", "failed": "red"}


def _when(t: float) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "…"
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"


def _trim(s: str | None, n: int = 80) -> str:
    s = (s or "").replace("\n", "⏎ ")
    return s if len(s) <= n else s[: n - 1] + "…"


def _status(status: str) -> Text:
    return Text(status, style=_STATUS_STYLE.get(status, "magenta"))


def trace_table(traces: Sequence[Trace], grades: dict[str, list[Grade]] | None = None) -> Table:
    """One row per trace: id prefix, start, env, task, adapter, status, latency, grade, answer."""
    table = Table(title=f"{len(traces)} traces (newest first)", show_lines=False)
    for col in ("id", "started", "env", "task", "adapter", "status", "time", "grade", "answer"):
        table.add_column(col, overflow="fold", no_wrap=col in ("id", "started", "status"))
    for t in traces:
        gs = (grades or {}).get(t.id, [])
        grade = ", ".join(f"{g.value:.2f}" for g in gs) if gs else ""
        table.add_row(
            t.id[:10], _when(t.start)[5:], t.env or "", t.task_id or "", t.adapter or "base",
            _status(t.status), _ms(t.latency_s), grade, _trim(t.answer or t.error, 40),
        )  # fmt: skip
    return table


def _label(s: Span) -> Text:
    label = Text()
    label.append(f"{s.kind} ", style="bold cyan")
    label.append(f"{s.name} ", style="bold")
    label.append(f"{_ms(s.latency_s)} ", style="dim")
    label.append_text(_status(s.status))
    if s.llm is not None:
        llm = s.llm
        if llm.input_tokens is not None or llm.output_tokens is not None:
            label.append(f"  tokens {llm.input_tokens or 0}→{llm.output_tokens or 0}", style="dim")
        if llm.tool_calls:
            label.append("  calls " + ", ".join(c.name for c in llm.tool_calls), style="yellow")
        if llm.completion:
            label.append(f"\n  ↳ {_trim(llm.completion)}", style="italic")
    if s.tool is not None:
        label.append(f"\n  args {_trim(str(s.tool.arguments))}", style="dim")
        if s.tool.error:
            label.append(f"\n  error {_trim(s.tool.error)}", style="red")
        elif s.tool.result is not None:
            label.append(f"\n  → {_trim(s.tool.result)}")
    if s.retrieval is not None:
        r = s.retrieval
        label.append(f"\n  query {_trim(r.query, 60)!r} → {len(r.ids)} hits", style="dim")
    if s.error and (s.tool is None or s.tool.error != s.error):
        label.append(f"\n  error {_trim(s.error)}", style="red")
    return label


def trace_tree(trace: Trace, grades: Sequence[Grade] = ()) -> Tree:
    """The span tree of one trace (read with its spans); orphans hang off the root."""
    head = Text()
    head.append(f"trace {trace.id} ", style="bold")
    head.append(f"{trace.env or '-'} / {trace.task_id or '-'} ")
    head.append(f"{trace.model or ''} {trace.adapter or 'base'} ", style="dim")
    head.append(f"{_ms(trace.latency_s)} ", style="dim")
    head.append_text(_status(trace.status))
    if trace.answer is not None:
        head.append(f"\nanswer: {_trim(trace.answer, 120)}")
    if trace.error:
        head.append(f"\nerror: {_trim(trace.error, 120)}", style="red")
    for g in grades:
        head.append(f"\ngrade {g.value:.2f} by {g.grader} ({g.source}) {_trim(g.reason, 60)}")
    root = Tree(head)
    ids = {s.id for s in trace.spans}
    children: dict[str | None, list[Span]] = {}
    for s in trace.spans:
        children.setdefault(s.parent_id if s.parent_id in ids else None, []).append(s)

    def add(node: Tree, parent: str | None) -> None:
        for s in sorted(children.get(parent, []), key=lambda x: x.start):
            add(node.add(_label(s)), s.id)

    add(root, None)
    return root


def stats_table(stats: Sequence[TraceStats]) -> Table:
    """Counts and success rates per (environment, adapter)."""
    table = Table(title="traces by environment and adapter")
    for col in (
        "env",
        "adapter",
        "traces",
        "ok",
        "failed",
        "running",
        "success",
        "graded",
        "mean grade",
    ):
        table.add_column(col, justify="left" if col in ("env", "adapter") else "right")
    for s in stats:
        rate = s.success_rate
        table.add_row(
            s.env or "-", s.adapter or "base", str(s.total), str(s.ok), str(s.failed),
            str(s.running), "-" if rate is None else f"{rate:.0%}", str(s.graded),
            "-" if s.mean_grade is None else f"{s.mean_grade:.3f}",
        )  # fmt: skip
    return table
