"""The `selftune` command. Thin: each command parses its arguments and calls one library function.

Heavy libraries (torch, transformers, chromadb) are imported inside the commands that need
them, so `selftune --help` and `selftune doctor` answer at once.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from agent.cli.common import current_config
from agent.config import Config

app = typer.Typer(
    help="selftune: an agent that records what it does, learns from it, and improves itself.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
out = Console()


@app.callback()
def _root(
    ctx: typer.Context,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="config file (default ./selftune.toml)")
    ] = None,
) -> None:
    ctx.obj = {"config": config}


def get_config(ctx: typer.Context | None = None, **overrides) -> Config:
    """The validated config for this invocation; a bad config ends the command with its message."""
    return current_config(**overrides)


def fail(message: str, code: int = 1) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


@app.command()
def setup(
    ctx: typer.Context,
    force: Annotated[
        bool, typer.Option(help="convert again even if the folder looks fine")
    ] = False,
) -> None:
    """Convert the embedded model into a safetensors folder in the workspace (idempotent)."""
    from agent.model.files import ModelError, setup_model

    cfg = get_config(ctx)
    try:
        setup_model(cfg, force=force, log=lambda m: console.print(m))
    except ModelError as e:
        fail(str(e))


@app.command()
def doctor(ctx: typer.Context) -> None:
    """Show what is installed and where, the configuration, and whether each part is reachable."""
    from rich.table import Table

    from agent.cli.doctor import run_checks

    cfg = get_config(ctx)
    table = Table(title="selftune doctor", show_lines=False)
    for col in ("check", "ok", "detail"):
        table.add_column(col)
    checks = run_checks(cfg)
    for c in checks:
        table.add_row(c.name, "[green]yes[/green]" if c.ok else "[red]no[/red]", c.detail)
    out.print(table)
    out.print(f"model: {cfg.model.name}   backend: {cfg.model.backend}")
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


def _print_result(result, as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps(result.to_dict()))
        return
    out.print(result.answer or "")
    console.print(f"[dim]status {result.status} · trace {result.trace_id}[/dim]")


@app.command()
def chat(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(help="what to say to the model")],
    max_tokens: Annotated[int | None, typer.Option(help="max new tokens")] = None,
    temperature: Annotated[float | None, typer.Option()] = None,
    adapter: Annotated[
        str | None, typer.Option(help="registry version, 'active' or 'base'")
    ] = None,
) -> None:
    """One model turn, no tools: print the model's answer."""
    from agent.workspace import chat_once

    cfg = get_config(ctx)
    try:
        text = chat_once(
            cfg, prompt, max_tokens=max_tokens, temperature=temperature, adapter=adapter
        )
    except Exception as e:  # noqa: BLE001 - every failure becomes one readable line
        fail(f"{type(e).__name__}: {e}")
    out.print(text)


@app.command()
def run(
    ctx: typer.Context,
    task: Annotated[str, typer.Argument(help="the task for the agent")],
    tools: Annotated[
        str | None, typer.Option(help="comma-separated tool names (default: [agent] tools)")
    ] = None,
    thread: Annotated[str | None, typer.Option(help="resume or continue this conversation")] = None,
    max_steps: Annotated[int | None, typer.Option()] = None,
    adapter: Annotated[
        str | None, typer.Option(help="registry version, 'active' or 'base'")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Run the agent on one task with its tools; print the answer and the trace id."""
    from agent.agent import Agent

    cfg = get_config(ctx)
    if max_steps:
        cfg.agent.max_steps = max_steps

    async def go():
        async with Agent.from_config(cfg, adapter=adapter) as agent:
            names = (
                [t.strip() for t in tools.split(",") if t.strip()] if tools is not None else None
            )
            return await agent.run(task, tools=names, thread_id=thread)

    try:
        result = asyncio.run(go())
    except Exception as e:  # noqa: BLE001
        fail(f"{type(e).__name__}: {e}")
    _print_result(result, as_json)
    if result.status not in ("ok",):
        raise typer.Exit(3)


def _suite(
    ctx: typer.Context,
    env: str,
    split: str,
    limit: int | None,
    concurrency: int,
    adapter: str | None,
    few_shot: int,
    samples: int,
    temperature: float | None,
    seed: int,
    as_json: bool,
    strict: bool,
    hints: bool = False,
) -> None:
    from agent.cli.show import print_suite
    from agent.envs.run import run_suite

    cfg = get_config(ctx)
    try:
        result = asyncio.run(
            run_suite(
                cfg,
                env,
                split=split,
                limit=limit,
                concurrency=concurrency,
                adapter=adapter,
                few_shot=few_shot,
                samples=samples,
                temperature=temperature,
                seed=seed,
                progress=not as_json,
                strict=strict,
                hints=hints,
            )
        )
    except Exception as e:  # noqa: BLE001
        fail(f"{type(e).__name__}: {e}")
    if as_json:
        out.print_json(json.dumps(result.to_dict()))
    else:
        print_suite(result, out)


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


@app.command("eval")
def eval_cmd(
    ctx: typer.Context,
    env: Env,
    split: Annotated[str, typer.Option(help="train or test")] = "test",
    limit: Limit = None,
    concurrency: Concurrency = 4,
    adapter: AdapterOpt = None,
    few_shot: FewShot = 0,
    samples: Annotated[int, typer.Option(help="episodes per task")] = 1,
    temperature: Annotated[float | None, typer.Option(help="sampling temperature")] = None,
    seed: Seed = 0,
    as_json: Json = False,
    strict: Strict = False,
) -> None:
    """Run the agent on an environment's tasks, grade every trace, print the success rate."""
    _suite(
        ctx,
        env,
        split,
        limit,
        concurrency,
        adapter,
        few_shot,
        samples,
        temperature,
        seed,
        as_json,
        strict,
    )


@app.command()
def collect(
    ctx: typer.Context,
    env: Env,
    limit: Limit = None,
    concurrency: Concurrency = 4,
    adapter: AdapterOpt = None,
    few_shot: FewShot = 0,
    samples: Annotated[int, typer.Option(help="episodes per task (for best-of-N, groups)")] = 4,
    temperature: Annotated[float, typer.Option(help="sampling temperature")] = 0.7,
    seed: Seed = 0,
    as_json: Json = False,
    strict: Strict = False,
    hints: Annotated[
        bool, typer.Option(help="append each task's hint to its prompt (removed in datasets)")
    ] = False,
) -> None:
    """Collect graded traces on the train split, several samples per task."""
    _suite(
        ctx,
        env,
        "train",
        limit,
        concurrency,
        adapter,
        few_shot,
        samples,
        temperature,
        seed,
        as_json,
        strict,
        hints,
    )


@app.command()
def feedback(
    ctx: typer.Context,
    trace_id: Annotated[str, typer.Argument(help="a trace id or a unique prefix")],
    verdict: Annotated[str, typer.Argument(help="up or down")],
    note: Annotated[str | None, typer.Option(help="why")] = None,
    who: Annotated[str | None, typer.Option(help="who gives it (default: $USER)")] = None,
) -> None:
    """Record a human thumbs up or down on a trace."""
    from agent.workspace import open_store
    from traces.feedback import record_feedback

    if verdict not in ("up", "down"):
        fail(f"verdict must be 'up' or 'down', got {verdict!r}")
    store = open_store(get_config(ctx))
    try:
        grade = record_feedback(store, trace_id, verdict == "up", note=note, who=who)
    except KeyError as e:
        fail(str(e))
    out.print(f"recorded {verdict} on {grade.trace_id} as {grade.grader}")


@app.command()
def review(
    ctx: typer.Context,
    env: Annotated[str | None, typer.Option(help="only this environment")] = None,
    ungraded: Annotated[bool, typer.Option(help="only traces with no human feedback yet")] = False,
    limit: Annotated[int, typer.Option(help="at most N traces")] = 50,
    who: Annotated[str | None, typer.Option(help="who gives it (default: $USER)")] = None,
) -> None:
    """Walk through traces one by one: u = up, d = down, s = skip, n = note, q = quit."""
    from agent.workspace import open_store
    from traces.feedback import review_loop

    store = open_store(get_config(ctx))
    counts = review_loop(store, env=env, ungraded=ungraded, limit=limit, who=who, console=out)
    out.print(f"up {counts['up']}, down {counts['down']}, skipped {counts['skip']}")


@app.command()
def improve(
    ctx: typer.Context,
    envs: Annotated[
        list[str] | None, typer.Argument(help="environments (default: calculator docs-qa)")
    ] = None,
    cycles: Annotated[int, typer.Option(help="improvement cycles to run")] = 1,
    method: Annotated[str, typer.Option(help="sft, dpo, kto or grpo (online RL)")] = "sft",
    budget_minutes: Annotated[
        float | None, typer.Option(help="start no new cycle after this")
    ] = None,
    every: Annotated[
        str | None, typer.Option(help="keep running on a schedule: 30m, 6h, 1d")
    ] = None,
    resume: Annotated[
        bool | None,
        typer.Option(
            "--resume/--fresh", help="resume the last unfinished job (default: if there is one)"
        ),
    ] = None,
    collect_limit: Annotated[int, typer.Option(help="train tasks per environment per cycle")] = 108,
    eval_limit: Annotated[int, typer.Option(help="held-out test tasks per environment")] = 54,
    few_shot: Annotated[
        int, typer.Option(help="demonstrations while collecting, while the model is weak")
    ] = 2,
    hints: Annotated[
        bool, typer.Option(help="a collection wave with the tasks' hints, where they have any")
    ] = True,
    concurrency: Concurrency = 16,
    max_tokens: Annotated[int, typer.Option(help="max new tokens per model call")] = 64,
    max_train_steps: Annotated[
        int, typer.Option(help="cap on training steps (-1: [tuner] epochs; grpo: 8)")
    ] = -1,
    seed: Seed = 0,
) -> None:
    """Collect, grade, build a dataset, tune, gate, promote and reload: the self-improvement loop."""
    from agent.model.files import ModelError
    from agent.serving.vllm import VllmError
    from tuner.grpo import GrpoError
    from tuner.improve import ImproveError, ImproveSettings, parse_every
    from tuner.improve import improve as run_improve
    from tuner.registry import RegistryError
    from tuner.train import TrainError

    if method not in ("sft", "dpo", "kto", "grpo"):
        fail(f"--method must be sft, dpo, kto or grpo, got {method!r}")
    cfg = get_config(ctx)
    try:
        settings = ImproveSettings(
            envs=list(envs or ["calculator", "docs-qa"]),
            cycles=cycles,
            method=method,
            budget_minutes=budget_minutes,
            collect_limit=collect_limit,
            eval_limit=eval_limit,
            few_shot=few_shot,
            hints=hints,
            concurrency=concurrency,
            max_tokens=max_tokens,
            max_train_steps=max_train_steps,
            seed=seed,
            every_s=parse_every(every) if every else None,
        )
        asyncio.run(run_improve(cfg, settings, resume=resume, console=console))
    # errors whose message says what to do (run `selftune setup`, say): one line, no traceback
    except (ImproveError, ModelError, GrpoError, RegistryError, TrainError, VllmError) as e:
        fail(str(e))


def _wire_subcommands() -> None:
    """Sub-command groups live beside the library code they call."""
    from agent.cli import dataset as cli_dataset
    from agent.cli import serve as cli_serve
    from agent.cli import tools as cli_tools
    from agent.cli import traces as cli_traces
    from agent.cli import tune as cli_tune

    app.add_typer(cli_traces.traces_app, name="traces", help="List, show, export and prune traces.")
    app.add_typer(
        cli_dataset.dataset_app, name="dataset", help="Build training datasets from graded traces."
    )
    app.add_typer(
        cli_tools.tools_app, name="tools", help="List tools with their source, or call one."
    )
    app.add_typer(cli_tools.mcp_app, name="mcp", help="Serve selftune's tools over MCP.")
    app.add_typer(cli_serve.serve_app, name="serve")
    app.add_typer(cli_tune.tune_app, name="tune", help="Train a LoRA adapter on a dataset folder.")
    app.add_typer(
        cli_tune.adapters_app,
        name="adapters",
        help="The adapter registry: list, show, promote, rollback, diff.",
    )
    app.command("index")(cli_tools.index_cmd)
    app.command("search")(cli_tools.search_cmd)


_wire_subcommands()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
