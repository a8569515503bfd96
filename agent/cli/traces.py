"""`selftune traces ...`: list, show, export, push, stats and prune stored traces.

Also `selftune feedback` and `selftune review`, a person's thumbs up or down on traces. The
store is `[traces] db`, else `<workspace>/traces.db`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from agent.cli.common import command_group, fail, get_config
from agent.cli.common import out as console
from agent.workspace import open_store, trace_db_path
from traces import times
from traces.otel import OtlpPushError, export_otlp_json, otlp_endpoint, otlp_headers, push_traces
from traces.render import stats_table, trace_table, trace_tree
from traces.schemas import Trace, TraceQuery
from traces.store import TraceStore, TraceStoreError, export_jsonl

traces_app = command_group("Inspect, export and prune recorded traces.")


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


def _open(ctx: typer.Context, must_exist: bool = True) -> TraceStore:
    path = trace_db_path(get_config(ctx))
    if must_exist and not path.exists():
        raise TraceStoreError(
            f"no trace store at {path}: run an episode first, or set [traces] db / SELFTUNE_HOME"
        )
    return TraceStore(path)


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
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per trace")] = False,
) -> None:
    """List traces, newest first."""
    q = _query(env, task, adapter, status, tag, since, until, min_grade, max_grade, grader, limit)
    try:
        with _open(ctx) as store:
            traces = store.query(q)
            if as_json:
                for t in traces:
                    row = t.model_dump(mode="json", exclude={"spans"})
                    row["grades"] = [g.model_dump(mode="json") for g in store.grades(t.id)]
                    typer.echo(json.dumps(row, ensure_ascii=False))
                return
            console.print(trace_table(traces, {t.id: store.grades(t.id) for t in traces}))
    except TraceStoreError as e:
        fail(str(e))


@traces_app.command("show")
def show_cmd(
    ctx: typer.Context, trace_id: Annotated[str, typer.Argument(help="id or unique prefix")]
) -> None:
    """Show one trace as a tree of spans with timings."""
    try:
        with _open(ctx) as store:
            trace = store.get(trace_id)
            console.print(trace_tree(trace, store.grades(trace.id)))
    except TraceStoreError as e:
        fail(str(e))


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
        cfg = get_config(ctx)
        with _open(ctx) as store:
            patterns = cfg.traces.scrub_patterns
            if fmt == "jsonl":
                n = export_jsonl(store, out, q, patterns)
                console.print(f"wrote {n} traces to {out}")
            else:
                n = export_otlp_json(
                    store.query(q, with_spans=True), out, cfg.traces.capture_content, patterns,
                    grades_of=store.grades,
                )  # fmt: skip
                console.print(f"wrote {n} OTel spans to {out}")
    except TraceStoreError as e:
        fail(str(e))
    except OSError as e:  # a full disk or a folder not ours: no half-written export left
        if out.is_file():
            out.unlink()
        fail(f"cannot write {out} ({e.strerror or e}): free space or choose another path")


@traces_app.command("push")
def push_cmd(
    ctx: typer.Context,
    endpoint: Annotated[
        str | None,
        typer.Option(
            "--endpoint",
            help="OTLP/HTTP traces URL, e.g. http://localhost:6006/v1/traces (default: "
            "[traces] otlp_endpoint, else OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / _ENDPOINT)",
        ),
    ] = None,
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
    batch: Annotated[int, typer.Option("--batch", min=1, help="spans per request")] = 512,
) -> None:
    """Send matching stored traces (scrubbed, with their grades) to an OpenTelemetry collector,
    Arize Phoenix or Langfuse over OTLP/HTTP protobuf."""
    q = _query(env, task, adapter, status, tag, since, until, min_grade, max_grade, grader, limit)
    cfg = get_config(ctx)
    url = otlp_endpoint(endpoint or cfg.traces.otlp_endpoint)
    if url is None:
        fail(
            "no OTLP endpoint: give --endpoint URL, set [traces] otlp_endpoint, or "
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
    try:
        with _open(ctx) as store:
            n = push_traces(
                _pages(store, q),
                url,
                otlp_headers(cfg.traces.otlp_headers),
                capture_content=cfg.traces.capture_content,
                extra_patterns=cfg.traces.scrub_patterns,
                grades_of=store.grades,
                batch_size=batch,
            )
    except (TraceStoreError, OtlpPushError) as e:
        fail(str(e))
    console.print(f"sent {n} OTel spans to {url}")


def _pages(store: TraceStore, q: TraceQuery, page: int = 200) -> Iterator[Trace]:
    """Every trace `q` matches, with spans, read `page` traces at a time."""
    left = q.limit
    offset = q.offset
    while left is None or left > 0:
        n = page if left is None else min(page, left)
        traces = store.query(q.model_copy(update={"limit": n, "offset": offset}), with_spans=True)
        yield from traces
        if len(traces) < n:
            return
        offset += n
        left = None if left is None else left - n


@traces_app.command("stats")
def stats_cmd(ctx: typer.Context, env: Env = None, since: Since = None) -> None:
    """Counts and success rates by environment and adapter."""
    try:
        with _open(ctx) as store:
            console.print(stats_table(store.stats(env=env, since=parse_time(since))))
    except TraceStoreError as e:
        fail(str(e))


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
    except TraceStoreError as e:
        fail(str(e))


def feedback(
    ctx: typer.Context,
    trace_id: Annotated[
        str,
        typer.Argument(help="a trace id, a unique prefix, or a response id (chatcmpl-...)"),
    ],
    verdict: Annotated[
        str | None,
        typer.Argument(help="up or down (optional with --score, --correction, --private)"),
    ] = None,
    note: Annotated[str | None, typer.Option(help="why")] = None,
    who: Annotated[str | None, typer.Option(help="who gives it (default: $USER)")] = None,
    score: Annotated[
        float | None, typer.Option(help="a score from 0 to 1 (with no verdict, the grade's value)")
    ] = None,
    correction: Annotated[
        str | None,
        typer.Option(
            help="the answer that was wanted: an SFT row and a DPO pair (it chosen, the answer rejected)"
        ),
    ] = None,
    private: Annotated[
        bool,
        typer.Option(
            "--private", help="keep the trace's whole session out of training, from now on"
        ),
    ] = False,
) -> None:
    """Record a person's feedback on a trace: thumbs up or down, a score, a correction, and/or
    mark its session private (what `POST /v1/feedback` takes)."""
    from agent.serving.recording import trace_id_of
    from traces.feedback import FeedbackError, give_feedback
    from traces.store import TraceNotFoundError

    if verdict is not None and verdict not in ("up", "down"):
        fail(f"verdict must be 'up' or 'down', got {verdict!r}")
    if verdict is None and score is None and correction is None and not private:
        fail("give a verdict (up or down), --score, --correction or --private")
    store = open_store(get_config(ctx))
    try:
        given = give_feedback(
            store,
            trace_id_of(trace_id),
            None if verdict is None else verdict == "up",
            score=score,
            note=note,
            correction=correction,
            private=private,
            who=who,
        )
    except TraceNotFoundError as e:
        fail(f"{e.args[0] if e.args else e}: see `selftune traces list`")
    except FeedbackError as e:
        fail(str(e))
    finally:
        store.close()
    if private:
        console.print(
            f"marked session {given.session} private: {len(given.marked)} traces stay out of "
            "training"
        )
    if (grade := given.grade) is not None:
        what = verdict or ("corrected" if correction is not None else f"score {grade.value:g}")
        console.print(f"recorded {what} on {grade.trace_id} as {grade.grader}")


def review(
    ctx: typer.Context,
    env: Annotated[str | None, typer.Option(help="only this environment")] = None,
    ungraded: Annotated[bool, typer.Option(help="only traces with no human feedback yet")] = False,
    limit: Annotated[int, typer.Option(help="at most N traces")] = 50,
    who: Annotated[str | None, typer.Option(help="who gives it (default: $USER)")] = None,
) -> None:
    """Walk through traces one by one: u = up, d = down, s = skip, n = note, q = quit."""
    from traces.feedback import review_loop

    store = open_store(get_config(ctx))
    counts = review_loop(store, env=env, ungraded=ungraded, limit=limit, who=who, console=console)
    console.print(f"up {counts['up']}, down {counts['down']}, skipped {counts['skip']}")
