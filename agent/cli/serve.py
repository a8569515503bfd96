"""`selftune serve`: an OpenAI-compatible server for the configured model and its adapters."""

from __future__ import annotations

import signal
from pathlib import Path

import typer

serve_app = typer.Typer(help="Serve the model over the OpenAI protocol.")


@serve_app.callback(invoke_without_command=True)
def serve(
    engine: str = typer.Option(
        "local", help="local (in this process) or vllm (a vLLM server from its own venv)"
    ),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, help="port to listen on"),
    adapter: list[str] = typer.Option(
        [], help="NAME=FOLDER of a LoRA adapter to load at start (repeatable; local engine)"
    ),
    print_command: bool = typer.Option(
        False,
        "--print-command",
        help="vllm: print the command that starts vLLM (to run it yourself) and exit",
    ),
    config: Path | None = typer.Option(None, "--config", help="selftune.toml to use"),
) -> None:
    """Serve /v1/chat/completions, /v1/models and vLLM's LoRA routes on HOST:PORT."""
    try:
        if engine == "vllm":
            _serve_vllm(host, port, print_command, config)
            return
        from agent.serving.openai_server import run_server

        run_server(engine=engine, host=host, port=port, adapters=adapter, config=config)
    except (ValueError, RuntimeError) as e:  # ConfigError, ModelError, VllmError: say why
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


def _serve_vllm(host: str, port: int, print_command: bool, config: Path | None) -> None:
    from agent.config import load_config
    from agent.serving.vllm import prepare, shell_command

    cfg = load_config(config)
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
