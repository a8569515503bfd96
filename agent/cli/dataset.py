"""`selftune dataset build sft|dpo|kto|grpo`: training rows from graded traces.

    selftune dataset build sft --env calculator --min-score 1 --exclude-flagged --best-of-n \\
        --format openai --out .selftune/datasets/calc-sft

The command calls `agent.workspace.build_from_config`, which a user can call from Python too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from agent.cli.common import command_group, fail, get_config
from traces.datasets import DATASET_KINDS, DatasetError, DatasetFilters

dataset_app = command_group("Build training datasets (SFT, DPO, KTO, GRPO) from graded traces.")


@dataset_app.callback()
def _group() -> None:
    """Build training datasets (SFT, DPO, KTO, GRPO) from graded traces."""  # keeps `build` a sub-command


@dataset_app.command("build")
def build(
    ctx: typer.Context,
    kind: Annotated[str, typer.Argument(help="sft | dpo | kto | grpo")],
    env: Annotated[str | None, typer.Option(help="only traces of this environment")] = None,
    min_score: Annotated[
        float, typer.Option(help="a trace passes with a score at or above this (0-1)")
    ] = 1.0,
    exclude_flagged: Annotated[
        bool, typer.Option("--exclude-flagged", help="drop traces with reward-hacking flags")
    ] = False,
    best_of_n: Annotated[
        bool, typer.Option("--best-of-n", help="sft/dpo: only the best passing trace per task")
    ] = False,
    since: Annotated[
        str | None, typer.Option(help="only traces started since: 7d, 12h, 2026-05-01, epoch")
    ] = None,
    grader: Annotated[str | None, typer.Option(help="score by this grader's grades")] = None,
    fmt: Annotated[
        str, typer.Option("--format", help="trl, or openai (also writes openai.jsonl)")
    ] = "trl",
    out: Annotated[
        Path | None, typer.Option(help="output folder (default <workspace>/datasets/ENV-KIND)")
    ] = None,
) -> None:
    """Build a dataset folder: train.jsonl, manifest.json, SUMMARY.md (and openai.jsonl)."""
    if kind not in DATASET_KINDS:
        fail(f"unknown dataset kind {kind!r}: choose one of {', '.join(DATASET_KINDS)}", 2)
    if fmt not in ("trl", "openai"):
        fail(f"unknown --format {fmt!r}: choose trl or openai", 2)
    from agent.workspace import build_from_config

    cfg = get_config(ctx)
    try:
        filters = DatasetFilters(
            env=env,
            min_score=min_score,
            exclude_flagged=exclude_flagged,
            best_of_n=best_of_n,
            since=since,
            grader=grader,
        )
        formats = ("trl", "openai") if fmt == "openai" else ("trl",)
        result = build_from_config(cfg, kind, out, filters, formats)
    except DatasetError as e:
        fail(str(e))
    m = result.manifest
    typer.echo(f"{m['rows']} {kind} rows from {len(m['trace_ids'])} traces -> {result.path}")


@dataset_app.command("traffic")
def traffic(
    ctx: typer.Context,
    kind: Annotated[str, typer.Argument(help="sft | dpo | kto")],
    since: Annotated[
        str | None, typer.Option(help="only traces started since: 7d, 12h, 2026-05-01, epoch")
    ] = None,
    all_traces: Annotated[
        bool,
        typer.Option("--all-traces", help="every trace with feedback, not only served traffic"),
    ] = False,
    out: Annotated[
        Path | None, typer.Option(help="output folder (default <workspace>/datasets/traffic-KIND)")
    ] = None,
) -> None:
    """Rows from people's feedback on served traffic: thumbs and corrections (SFT), corrections
    as DPO pairs, thumbs as KTO labels; provenance.json says which feedback made each row."""
    from agent.workspace import open_store
    from traces.feedback import FEEDBACK_KINDS, build_feedback_dataset

    if kind not in FEEDBACK_KINDS:
        fail(f"unknown kind {kind!r}: choose one of {', '.join(FEEDBACK_KINDS)}", 2)
    cfg = get_config(ctx)
    store = open_store(cfg)
    try:
        result = build_feedback_dataset(
            store,
            kind,
            out or cfg.workspace.datasets / f"traffic-{kind}",
            since=since,
            tag=None if all_traces else "traffic",
            scrub_patterns=cfg.traces.scrub_patterns,
        )
    except DatasetError as e:
        fail(str(e))
    finally:
        store.close()
    m = result.manifest
    typer.echo(f"{m['rows']} {kind} rows from {len(m['trace_ids'])} traces -> {result.path}")
