"""`selftune traces ...`: list, show, export, stats and prune stored traces.

Wired into the root app with `app.add_typer(traces_app, name="traces")`. The store is
`[traces] db`, else `<workspace>/traces.db`; the root app's `--config` arrives in `ctx.obj`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from agent.config import ConfigError, load_config
from traces import times
from traces.otel import export_otlp_json
from traces.render import stats_table, trace_table, trace_tree
from traces.schemas import TraceQuery
from traces.store import TraceStore, TraceStoreError, export_jsonl

traces_app = typer.Typer(help="Inspect, export and prune recorded traces.", no_args_is_help=True)
console = Console()


def parse_duration(s: str) -> float:
    """'30d', '12h', '90m', '45s', '2w' -> seconds."""
    try:
        return times.parse_duration(s)
    except times.TimeParseError as e:
        raise typer.BadParameter(str(e)) from None


def parse_time(s: str | None) -> float | None:
    """A duration ago ('7d'), an ISO date/time ('2026-01-31', '2026-01-31T12:00') or epoch -> epoch."""
    try:
        return None if s is None else times.parse_time(s)
    except times.TimeParseError as e:
        raise typer.BadParameter(str(e)) from None


def _config(ctx: typer.Context):
    path = ctx.obj.get("config") if isinstance(ctx.obj, dict) else None
    return load_config(path)


def _open(ctx: typer.Context, must_exist: bool = True) -> TraceStore:
    cfg = _config(ctx)
    path = Path(cfg.traces.db or cfg.workspace.traces_db)
    if must_exist and not path.exists():
        raise TraceStoreError(
            f"no trace store at {path}: run an episode first, or set [traces] db / SELFTUNE_HOME"
        )
    return TraceStore(path)


def _fail(e: Exception) -> typer.Exit:
    console.print(f"[red]error:[/red] {e}", highlight=False)
    return typer.Exit(1)


# the filter options shared by list and export
Env = Annotated[str | None, typer.Option("--env", help="environment name")]
Task = Annotated[str | None, typer.Option("--task", help="task id")]
Adapter = Annotated[str | None, typer.Option("--adapter", help="adapter version; 'base' = none")]
Status = Annotated[str | None, typer.Option("--status", help="ok, error, failed, running, ...")]
Tag = Annotated[str | None, typer.Option("--tag", help="a tag the trace carries")]
Since = Annotated[str | None, typer.Option("--since", help="7d, 12h or an ISO date")]
Until = Annotated[str | None, typer.Option("--until", help="7d, 12h or an ISO date")]
MinGrade = Annotated[float | None, typer.Option("--min-grade", help="some grade >= this")]
MaxGrade = Annotated[float | None, typer.Option("--max-grade", help="some grade <= this")]
Grader = Annotated[str | None, typer.Option("--grader", help="grade filters use this grader")]


def _query(env, task, adapter, status, tag, since, until, min_grade, max_grade, grader, limit):
    try:
        return TraceQuery(
            env=env, task_id=task, adapter=adapter, status=status, tag=tag,
            since=parse_time(since), until=parse_time(until), min_grade=min_grade,
            max_grade=max_grade, grader=grader, limit=limit,
        )  # fmt: skip
    except ValueError as e:  # pydantic names the field and what is allowed
        raise typer.BadParameter(str(e)) from None


@traces_app.command("list")
def list_cmd(
    ctx: typer.Context,
    env: Env = None,
    task: Task = None,
    adapter: Adapter = None,
    status: Status = None,
    tag: Tag = None,
    since: Since = None,
    until: Until = None,
    min_grade: MinGrade = None,
    max_grade: MaxGrade = None,
    grader: Grader = None,
    limit: Annotated[int, typer.Option("--limit", min=1)] = 20,
) -> None:
    """List traces, newest first."""
    q = _query(env, task, adapter, status, tag, since, until, min_grade, max_grade, grader, limit)
    try:
        with _open(ctx) as store:
            traces = store.query(q)
            console.print(trace_table(traces, {t.id: store.grades(t.id) for t in traces}))
    except (TraceStoreError, ConfigError) as e:
        raise _fail(e) from None


@traces_app.command("show")
def show_cmd(
    ctx: typer.Context, trace_id: Annotated[str, typer.Argument(help="id or unique prefix")]
) -> None:
    """Show one trace as a tree of spans with timings."""
    try:
        with _open(ctx) as store:
            trace = store.get(trace_id)
            console.print(trace_tree(trace, store.grades(trace.id)))
    except (TraceStoreError, ConfigError) as e:
        raise _fail(e) from None


@traces_app.command("export")
def export_cmd(
    ctx: typer.Context,
    out: Annotated[Path, typer.Argument(help="file to write")],
    fmt: Annotated[str, typer.Option("--format", help="jsonl or otel-json")] = "jsonl",
    env: Env = None,
    task: Task = None,
    adapter: Adapter = None,
    status: Status = None,
    tag: Tag = None,
    since: Since = None,
    until: Until = None,
    min_grade: MinGrade = None,
    max_grade: MaxGrade = None,
    grader: Grader = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1)] = None,
) -> None:
    """Export matching traces (scrubbed): JSONL (trace + spans + grades per line) or OTLP/JSON."""
    if fmt not in ("jsonl", "otel-json"):
        raise typer.BadParameter(f"--format {fmt!r}: use jsonl or otel-json")
    q = _query(env, task, adapter, status, tag, since, until, min_grade, max_grade, grader, limit)
    try:
        cfg = _config(ctx)
        with _open(ctx) as store:
            patterns = cfg.traces.scrub_patterns
            if fmt == "jsonl":
                n = export_jsonl(store, out, q, patterns)
                console.print(f"wrote {n} traces to {out}")
            else:
                n = export_otlp_json(
                    store.query(q, with_spans=True), out, cfg.traces.capture_content, patterns
                )
                console.print(f"wrote {n} OTel spans to {out}")
    except (TraceStoreError, ConfigError) as e:
        raise _fail(e) from None


@traces_app.command("stats")
def stats_cmd(ctx: typer.Context, env: Env = None, since: Since = None) -> None:
    """Counts and success rates by environment and adapter."""
    try:
        with _open(ctx) as store:
            console.print(stats_table(store.stats(env=env, since=parse_time(since))))
    except (TraceStoreError, ConfigError) as e:
        raise _fail(e) from None


@traces_app.command("prune")
def prune_cmd(
    ctx: typer.Context,
    older_than: Annotated[str | None, typer.Option("--older-than", help="e.g. 30d")] = None,
    env: Env = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask")] = False,
) -> None:
    """Delete old traces (or one environment's), then vacuum the store."""
    if older_than is None and env is None:
        raise typer.BadParameter("give --older-than (e.g. 30d) and/or --env")
    age = parse_duration(older_than) if older_than else None
    try:
        with _open(ctx) as store:
            n = store.count(env=env, until=None if age is None else time.time() - age)
            if n == 0:
                console.print("nothing to prune")
                return
            if not yes and not typer.confirm(f"delete {n} traces from {store.path}?"):
                raise typer.Exit(1)
            deleted = store.prune(older_than_s=age, env=env)
            console.print(f"deleted {deleted} traces and vacuumed {store.path}")
    except (TraceStoreError, ConfigError) as e:
        raise _fail(e) from None
