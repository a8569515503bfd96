"""The `selftune` command, and selftune's composition root: the only part of `agent` that may
import `tuner`. Each command parses its arguments and calls one library function a user could
call from Python too; one file per command group.

Heavy libraries (torch, transformers, chromadb) are imported inside the commands that need
them, so `selftune --help` and `selftune doctor` answer at once.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from agent.cli import dataset, router, run, serve, tools, traces, tune
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
app.add_typer(
    router.router_app, name="router", help="Fit and query the route classifier (routed adapters)."
)


_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}


def _os_error(e: OSError) -> str | None:
    """A disk or permission error as one line with its fix; None for any other OSError."""
    if e.errno in _DISK_FULL:
        where = f" holding {e.filename}" if e.filename else ""
        return f"no space left on the disk{where}: free space, then run again"
    if e.errno in _NOT_WRITABLE:
        where = f" {e.filename}" if e.filename else ""
        return f"cannot write{where} ({e.strerror}): choose a folder you may write to"
    return None


def _exit(code: int) -> None:
    """Exit with `code`, even when a worker thread would block the interpreter's exit (an
    error must end the command, never leave it hanging)."""
    deadline = time.monotonic() + 5.0
    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() and not t.daemon for t in threading.enumerate()[1:]):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main() -> None:
    try:
        app()
    except SelftuneError as e:  # its message says what to do: one line, no traceback
        console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        _exit(1)
    except OSError as e:
        message = _os_error(e)
        if message is None:
            raise
        console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
        _exit(1)
    except KeyboardInterrupt:
        console.print("interrupted")
        _exit(130)
