"""The `selftune` command, and selftune's composition root: the only part of `agent` that may
import `tuner`. Each command parses its arguments and calls one library function a user could
call from Python too; one file per command group.

Heavy libraries (torch, transformers, chromadb) are imported inside the commands that need
them, so `selftune --help` and `selftune doctor` answer at once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from agent.cli import dataset, run, serve, tools, traces, tune
from agent.cli.common import console

app = typer.Typer(
    help="selftune: an agent that records what it does, learns from it, and improves itself.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(
    ctx: typer.Context,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="config file (default ./selftune.toml)")
    ] = None,
) -> None:
    ctx.obj = {"config": config}


for command in (run.setup, run.doctor, run.chat, run.run, run.collect):
    app.command()(command)
app.command("eval")(run.eval_cmd)
app.command()(traces.feedback)
app.command()(traces.review)
app.command()(tune.improve)
app.command()(tune.gate)
app.command("index")(tools.index_cmd)
app.command("search")(tools.search_cmd)
app.add_typer(traces.traces_app, name="traces", help="List, show, export and prune traces.")
app.add_typer(
    dataset.dataset_app, name="dataset", help="Build training datasets from graded traces."
)
app.add_typer(tools.tools_app, name="tools", help="List tools with their source, or call one.")
app.add_typer(tools.mcp_app, name="mcp", help="Serve selftune's tools over MCP.")
app.add_typer(serve.serve_app, name="serve")
app.add_typer(tune.tune_app, name="tune", help="Train a LoRA adapter on a dataset folder.")
app.add_typer(
    tune.adapters_app,
    name="adapters",
    help="The adapter registry: list, show, promote, rollback, diff.",
)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
