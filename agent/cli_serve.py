"""`selftune serve`: an OpenAI-compatible server for the configured model and its adapters."""

from __future__ import annotations

from pathlib import Path

import typer

serve_app = typer.Typer(help="Serve the model over the OpenAI protocol.")


@serve_app.callback(invoke_without_command=True)
def serve(
    engine: str = typer.Option("local", help="local (in process); vllm is not yet available"),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, help="port to listen on"),
    adapter: list[str] = typer.Option(
        [], help="NAME=FOLDER of a LoRA adapter to load at start (repeatable)"
    ),
    config: Path | None = typer.Option(None, "--config", help="selftune.toml to use"),
) -> None:
    """Serve /v1/chat/completions, /v1/models and vLLM's LoRA routes on HOST:PORT."""
    from agent.openai_server import run_server

    try:
        run_server(engine=engine, host=host, port=port, adapters=adapter, config=config)
    except (ValueError, RuntimeError) as e:  # ConfigError, ModelError, AdapterError: say why
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
