"""The one way every `selftune` sub-command gets its configuration: the root's `--config`
(kept in the root click context), then SELFTUNE_* variables; a bad config ends the command
with its message and exit code 2."""

from __future__ import annotations

from typing import Any

import click
import typer
from rich.console import Console

from agent.config import Config, ConfigError, load_config


def current_config(**overrides: Any) -> Config:
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx is not None else None
    path = (
        (root.obj or {}).get("config") if root is not None and isinstance(root.obj, dict) else None
    )
    try:
        return load_config(path, overrides={k: v for k, v in overrides.items() if v})
    except ConfigError as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
