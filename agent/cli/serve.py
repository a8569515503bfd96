"""`selftune serve`: an OpenAI-compatible server for the configured model and its adapters."""

from __future__ import annotations

import signal
from pathlib import Path

import typer

from agent.cli.common import command_group, fail, get_config
from agent.config import Config

serve_app = command_group("Serve the model over the OpenAI protocol.", no_args_is_help=False)


@serve_app.callback(invoke_without_command=True)
def serve(
    ctx: typer.Context,
    engine: str = typer.Option(
        "local", help="local (in this process) or vllm (a vLLM server from its own venv)"
    ),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, help="port to listen on"),
    adapter: list[str] = typer.Option(
        [], help="NAME=FOLDER of a LoRA adapter to load at start (repeatable; local engine)"
    ),
    record: bool = typer.Option(
        True,
        "--record/--no-record",
        help="record every chat completion as a trace in the workspace's store (default: on)",
    ),
    agent: bool = typer.Option(
        True, "--agent/--no-agent", help="also serve the agent as the model 'selftune-agent'"
    ),
    upstream: str | None = typer.Option(
        None,
        help="proxy mode: forward completions to this OpenAI-compatible base URL "
        "(e.g. http://host:8000/v1) and record what it answers",
    ),
    upstream_key: str | None = typer.Option(
        None, envvar="SELFTUNE_UPSTREAM_KEY", help="API key for --upstream"
    ),
    api_key: str | None = typer.Option(
        None,
        envvar="SELFTUNE_API_KEY",
        help="require 'Authorization: Bearer KEY' (required when --host is not loopback)",
    ),
    print_command: bool = typer.Option(
        False,
        "--print-command",
        help="vllm: print the command that starts vLLM (to run it yourself) and exit",
    ),
    config: Path | None = typer.Option(
        None, "--config", help="selftune.toml to use (default: the root --config)"
    ),
) -> None:
    """Serve /v1/chat/completions (the model, its adapters and the agent as 'selftune-agent'),
    /v1/models, /v1/feedback and vLLM's LoRA routes on HOST:PORT, recording every answer."""
    if engine not in ("local", "vllm"):
        fail(f"--engine must be local or vllm, not {engine!r}", 2)
    cfg = get_config(ctx, config)
    try:
        if engine == "vllm":
            _serve_vllm(cfg, host, port, print_command)
            return
        from agent.serving.openai_server import run_server

        run_server(
            cfg,
            host=host,
            port=port,
            adapters=adapter,
            record=record,
            serve_agent=agent,
            upstream=upstream,
            upstream_key=upstream_key,
            api_key=api_key,
        )
    except (ValueError, RuntimeError) as e:  # ModelError, VllmError, a bad --adapter: say why
        fail(str(e), 2)


def _serve_vllm(cfg: Config, host: str, port: int, print_command: bool) -> None:
    from agent.serving.vllm import prepare, shell_command

    server = prepare(
        cfg, host=host, port=port, install=not print_command, log=lambda m: typer.echo(m, err=True)
    )
    if print_command:
        typer.echo(shell_command(server.argv, server.env))
        return
    # Ctrl-C and SIGTERM (systemd, kill) both stop vLLM cleanly, even where a shell started us
    # with SIGINT ignored (a background job)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    typer.echo(f"starting vLLM (log: {server.log_path})", err=True)
    server.start()
    try:
        server.wait_healthy()
        typer.echo(f"vLLM serves {cfg.model.name} at {server.url}")
        typer.echo(
            f'point selftune at it: [model] backend = "openai", base_url = "{server.url}"',
            err=True,
        )
        server.proc.wait()
        raise RuntimeError(
            f"vLLM stopped with code {server.proc.returncode}; see {server.log_path}"
        )
    except KeyboardInterrupt:
        typer.echo("stopping vLLM", err=True)
    finally:
        server.stop()
