"""`selftune setup | doctor | chat | run | eval | collect`: the model and the agent, one task or
an environment at a time."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from agent.cli.common import (
    AdapterOpt,
    Concurrency,
    Env,
    FewShot,
    Json,
    Limit,
    Seed,
    Strict,
    console,
    fail,
    get_config,
    out,
)


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


def doctor(
    ctx: typer.Context,
    as_json: Json = False,
) -> None:
    """Show what is installed and where, the configuration, and whether each part is reachable."""
    from agent.cli.doctor import run_checks
    from agent.cli.show import print_checks

    cfg = get_config(ctx)
    checks = run_checks(cfg)
    if as_json:
        typer.echo(json.dumps([vars(c) for c in checks], indent=2))
    else:
        print_checks(checks, cfg, out)
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


def _print_result(result, as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps(result.to_dict()))
        return
    out.print(result.answer or "")
    console.print(f"[dim]status {result.status} · trace {result.trace_id}[/dim]")


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


def run(
    ctx: typer.Context,
    task: Annotated[
        str | None, typer.Argument(help="the task for the agent; '-' reads it from stdin")
    ] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="read the task from this file")
    ] = None,
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

    task = read_task(task, file)
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


def read_task(task: str | None, file: Path | None) -> str:
    """The task from the argument, `-` (stdin) or --file, as valid UTF-8 text; else fail."""
    if (task is None) == (file is None):
        fail("give the task as an argument, '-' for stdin, or --file PATH (one of them)", 2)
    where = "the task argument"
    if file is not None:
        where = str(file)
        try:
            data = file.read_bytes()
        except OSError as e:
            fail(f"cannot read the task file {file}: {e.strerror}", 2)
    elif task == "-":
        where, data = "stdin", sys.stdin.buffer.read()
    else:
        # bytes that are not UTF-8 reach argv as lone surrogates (surrogateescape)
        data = task.encode("utf-8", "surrogateescape")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        fail(
            f"{where} is not valid UTF-8 (byte {e.start}: {data[e.start : e.start + 4]!r}): "
            "save it as UTF-8, e.g. `iconv -f latin1 -t utf-8`",
            2,
        )
    if not text.strip():
        fail(f"{where} is empty: say what the agent should do", 2)
    return text


def _suite(ctx: typer.Context, env: str, as_json: bool, **options) -> None:
    """Run `run_suite` with the command's options and print its table (or its JSON)."""
    from agent.cli.show import print_suite
    from agent.envs.run import run_suite

    cfg = get_config(ctx)
    try:
        result = asyncio.run(run_suite(cfg, env, progress=not as_json, **options))
    except Exception as e:  # noqa: BLE001 - every failure becomes one readable line
        fail(f"{type(e).__name__}: {e}")
    if as_json:
        out.print_json(json.dumps(result.to_dict()))
    else:
        print_suite(result, out)


def _robustness(ctx: typer.Context, env: str, spec: str, as_json: bool, **options) -> None:
    """Clean and perturbed runs of the same tasks, and the gap table."""
    from agent.cli.show import print_robustness
    from agent.envs.perturb import parse_perturbations
    from agent.envs.run import run_robustness

    try:
        names = parse_perturbations(spec)
    except ValueError as e:
        fail(str(e), 2)
    cfg = get_config(ctx)
    try:
        results = asyncio.run(run_robustness(cfg, env, names, progress=not as_json, **options))
    except Exception as e:  # noqa: BLE001 - every failure becomes one readable line
        fail(f"{type(e).__name__}: {e}")
    if as_json:
        out.print_json(json.dumps({k: r.to_dict() for k, r in results.items()}))
    else:
        print_robustness(results, out)


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
    perturb: Annotated[
        str | None,
        typer.Option(
            help="also run the tasks as users mistype them and print the gap: "
            "typos,case,spacing,verbose,terse (any of them, comma-separated)"
        ),
    ] = None,
) -> None:
    """Run the agent on an environment's tasks, grade every trace, print the success rate."""
    if perturb is not None:
        _robustness(
            ctx, env, perturb, as_json, split=split, limit=limit, concurrency=concurrency,
            adapter=adapter, few_shot=few_shot, samples=samples, temperature=temperature,
            seed=seed, strict=strict,
        )  # fmt: skip
        return
    _suite(
        ctx, env, as_json, split=split, limit=limit, concurrency=concurrency, adapter=adapter,
        few_shot=few_shot, samples=samples, temperature=temperature, seed=seed, strict=strict,
    )  # fmt: skip


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
        ctx, env, as_json, split="train", limit=limit, concurrency=concurrency, adapter=adapter,
        few_shot=few_shot, samples=samples, temperature=temperature, seed=seed, strict=strict,
        hints=hints,
    )  # fmt: skip


def check(
    ctx: typer.Context,
    env: Env,
    limit: Limit = None,
    as_json: Json = False,
) -> None:
    """Check an environment's grader: references must score 1; empty, constant and echoed
    answers must score 0. Exit 1 when a probe fails."""
    from agent.envs import EnvironmentLoadError, load_environment
    from agent.envs.check import check_environment

    cfg = get_config(ctx)
    try:
        environment = load_environment(env, config=cfg.agent)
    except EnvironmentLoadError as e:
        fail(str(e))
    report = asyncio.run(check_environment(environment, limit=limit))
    if as_json:
        out.print_json(
            json.dumps(
                {
                    "env": report.env,
                    "ok": report.ok,
                    "tasks": report.tasks,
                    "skipped": report.skipped,
                    "failed_by_probe": report.by_probe(),
                    "failures": [vars(f) for f in report.failures],
                }
            )
        )
    else:
        out.print(report.summary(), highlight=False, soft_wrap=True)
    if not report.ok:
        raise typer.Exit(1)
