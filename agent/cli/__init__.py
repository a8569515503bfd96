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
from agent.cli.common import command_group, console
from tools.errors import SelftuneError

app = command_group(
    "selftune: an agent that records what it does, learns from it, and improves itself."
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"selftune {version('selftune')}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="config file (default ./selftune.toml)")
    ] = None,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="print the version"),
    ] = False,
) -> None:
    ctx.obj = {"config": config}


for command in (run.setup, run.doctor, run.chat, run.run, run.collect, run.check):
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
    except SelftuneError as e:  # its message says what to do: one line, no traceback
        console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
