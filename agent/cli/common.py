"""What every command shares: the one way to get the configuration, the one way to fail, the
consoles, and the option types several commands take."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NoReturn

import click
import typer
from rich.console import Console
from rich.markup import escape

from agent.config import Config, ConfigError, load_config

console = Console(stderr=True)  # progress, errors, notes
out = Console()  # results a script may read


def command_group(help: str, **options: Any) -> typer.Typer:
    """A Typer app with selftune's conventions: -h and --help, help text shown as written
    (rich markup would eat "[agent] tools"), and no traceback pages."""
    options.setdefault("no_args_is_help", True)
    return typer.Typer(
        help=help,
        rich_markup_mode=None,
        pretty_exceptions_enable=False,
        add_completion=False,
        context_settings={"help_option_names": ["-h", "--help"]},
        **options,
    )


def config_path(ctx: click.Context | None) -> Path | None:
    """The root's `--config` (kept in the root context's obj), or None for ./selftune.toml."""
    root = ctx.find_root() if ctx is not None else None
    obj = root.obj if root is not None else None
    return obj.get("config") if isinstance(obj, dict) else None


def get_config(
    ctx: click.Context | None = None, path: Path | None = None, **overrides: Any
) -> Config:
    """The validated config for this invocation: `path`, else the root's `--config`, else
    ./selftune.toml; then SELFTUNE_* variables and `overrides` (None values are ignored).
    A bad config ends the command with its message and exit code 2."""
    ctx = ctx if ctx is not None else click.get_current_context(silent=True)
    try:
        return load_config(
            path or config_path(ctx),
            overrides={k: v for k, v in overrides.items() if v is not None},
        )
    except ConfigError as e:
        fail(str(e), 2)


def fail(message: str, code: int = 1) -> NoReturn:
    """End the command with one readable line on stderr and a non-zero exit code."""
    # escaped: "[traces] db" in a message is a config section, not rich markup
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


Env = Annotated[str, typer.Argument(help="a built-in environment name or a path")]
Limit = Annotated[int | None, typer.Option(help="run only the first N tasks")]
Concurrency = Annotated[int, typer.Option(help="episodes at once (the local backend batches them)")]
AdapterOpt = Annotated[
    str | None, typer.Option(help="vN, 'active' or 'base' (default: configured)")
]
FewShot = Annotated[int, typer.Option("--few-shot", help="K demonstrations as prior turns")]
Seed = Annotated[int, typer.Option(help="sampling seed of sample 0 (sample i uses seed+i)")]
Json = Annotated[bool, typer.Option("--json", help="write the result as JSON on stdout")]
Strict = Annotated[bool, typer.Option(help="a bad task line is an error, not a warning")]
