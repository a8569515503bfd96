"""`selftune tune ...` (train an adapter) and `selftune adapters ...` (the registry).

Also `selftune improve`, the loop that collects, tunes, gates and promotes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from agent.cli.common import Concurrency, Seed, console, fail, get_config, out

tune_app = typer.Typer(help="Train a LoRA adapter on a dataset folder.", no_args_is_help=True)
adapters_app = typer.Typer(
    help="List, inspect, promote and roll back adapters.", no_args_is_help=True
)

DatasetArg = Annotated[Path, typer.Argument(help="dataset folder (JSONL rows + manifest.json)")]
FromOpt = Annotated[
    str | None, typer.Option("--from", help="continue this adapter version (e.g. v3)")
]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="config file (default ./selftune.toml)")
]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="continue the killed job from its last checkpoint")
]
StepsOpt = Annotated[int | None, typer.Option("--max-steps", help="stop after this many steps")]
VllmOpt = Annotated[
    str | None,
    typer.Option("--vllm", help="also switch a running vLLM server (its URL) to the new adapter"),
]


def _registry(ctx: typer.Context):
    from tuner.registry import Registry

    return Registry(get_config(ctx).workspace.adapters)


def _run_tune(ctx, kind, dataset_dir, from_version, config, resume, max_steps) -> None:
    from agent.model.files import ModelError
    from tuner.registry import RegistryError
    from tuner.train import TrainError, tune

    cfg = get_config(ctx, config)
    try:
        rec = tune(
            kind, dataset_dir, cfg, from_version=from_version, resume=resume, max_steps=max_steps
        )
    except (TrainError, RegistryError, ModelError, ValueError) as e:
        fail(str(e))
    out.print(
        f"registered [bold]{rec.version}[/bold] (candidate) at {rec.path}: "
        f"{rec.metrics['global_step']} steps, final loss {rec.metrics['last_loss']:.4f}. "
        "Next: run the eval gate on it."
    )


@tune_app.command("sft")
def tune_sft(
    ctx: typer.Context,
    dataset_dir: DatasetArg,
    from_version: FromOpt = None,
    config: ConfigOpt = None,
    resume: ResumeOpt = False,
    max_steps: StepsOpt = None,
) -> None:
    """Supervised fine-tuning on conversations (loss on assistant tokens only)."""
    _run_tune(ctx, "sft", dataset_dir, from_version, config, resume, max_steps)


@tune_app.command("dpo")
def tune_dpo(
    ctx: typer.Context,
    dataset_dir: DatasetArg,
    from_version: FromOpt = None,
    config: ConfigOpt = None,
    resume: ResumeOpt = False,
    max_steps: StepsOpt = None,
) -> None:
    """Direct preference optimization on chosen/rejected pairs."""
    _run_tune(ctx, "dpo", dataset_dir, from_version, config, resume, max_steps)


@tune_app.command("kto")
def tune_kto(
    ctx: typer.Context,
    dataset_dir: DatasetArg,
    from_version: FromOpt = None,
    config: ConfigOpt = None,
    resume: ResumeOpt = False,
    max_steps: StepsOpt = None,
) -> None:
    """KTO on completions labelled good or bad."""
    _run_tune(ctx, "kto", dataset_dir, from_version, config, resume, max_steps)


@tune_app.command("grpo")
def tune_grpo(
    ctx: typer.Context,
    env: Annotated[str, typer.Argument(help="environment: built-in name or folder")],
    from_version: Annotated[
        str | None,
        typer.Option("--from", help="start from this version (default: the active one; 'base')"),
    ] = None,
    group_size: Annotated[int, typer.Option(help="episodes per task per step (G)")] = 4,
    steps: Annotated[int, typer.Option(help="policy updates")] = 8,
    tasks_per_step: Annotated[int, typer.Option(help="train tasks per step")] = 4,
    temperature: Annotated[float, typer.Option(help="rollout sampling temperature")] = 1.0,
    max_tokens: Annotated[int, typer.Option(help="max new tokens per model turn")] = 64,
    learning_rate: Annotated[float, typer.Option("--lr", help="AdamW learning rate")] = 5e-5,
    beta: Annotated[float, typer.Option(help="KL penalty to the starting adapter")] = 0.0,
    judge: Annotated[
        bool, typer.Option(help="mix in the group judge's ranking (RULER-style)")
    ] = False,
    seed: Annotated[int, typer.Option(help="task order and sampling seed")] = 0,
    rollout_engine: Annotated[
        str | None,
        typer.Option(
            help="agent: the agent's backend; vllm: a vLLM server of the run's own serving the "
            "merged policy (default: [tuner] grpo_rollout_engine)"
        ),
    ] = None,
    config: ConfigOpt = None,
    resume: ResumeOpt = False,
) -> None:
    """Online RL: sample G episodes per task with the agent, grade, update (GRPO)."""
    from agent.model.files import ModelError
    from agent.serving.vllm import VllmError
    from tuner.grpo import GrpoError, grpo
    from tuner.registry import RegistryError
    from tuner.schemas import GrpoConfig

    cfg = get_config(ctx, config)
    try:
        gc = GrpoConfig(
            steps=steps,
            group_size=group_size,
            tasks_per_step=tasks_per_step,
            temperature=temperature,
            max_tokens=max_tokens,
            learning_rate=learning_rate,
            beta=beta,
            judge=judge,
            seed=seed,
            rollout_engine=rollout_engine or cfg.tuner.grpo_rollout_engine,
        )
        rec = asyncio.run(
            grpo(cfg, env, gc, start_from=from_version, resume=resume, console=console)
        )
    except (GrpoError, RegistryError, ModelError, VllmError, ValueError) as e:
        fail(str(e))
    out.print(
        f"registered [bold]{rec.version}[/bold] (candidate) at {rec.path} after "
        f"{rec.metrics['steps']} GRPO steps. Next: run the eval gate on it."
    )


def _when(t: float) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")


@adapters_app.command("list")
def adapters_list(ctx: typer.Context) -> None:
    """Every version with its status, lineage and training result."""
    reg = _registry(ctx)
    table = Table(title=f"adapters in {reg.root}")
    for col in ("version", "status", "parent", "base model", "kind", "steps", "loss", "created"):
        table.add_column(col)
    for r in reg.list():
        loss = r.metrics.get("last_loss")
        table.add_row(
            r.version,
            f"[bold green]{r.status}[/bold green]" if r.status == "active" else r.status,
            r.parent or "-",
            r.base_model,
            str(r.train_config.get("kind", "-")),
            str(r.metrics.get("global_step", "-")),
            f"{loss:.4f}" if isinstance(loss, float) else "-",
            _when(r.created_at),
        )
    out.print(table)
    if reg.active() is None:
        out.print("active: the base model (no adapter promoted)")


@adapters_app.command("show")
def adapters_show(ctx: typer.Context, version: str) -> None:
    """The full record of one version, as JSON."""
    from tuner.registry import RegistryError

    try:
        rec = _registry(ctx).get(version)
    except RegistryError as e:
        fail(str(e))
    out.print_json(json.dumps({**rec.model_dump(), "path": rec.path}))


def _reload(url: str | None, rec) -> None:
    if url is None:
        return
    from tuner.reload import ReloadError, VllmReloader

    try:
        asyncio.run(VllmReloader(url).reload(rec))
    except ReloadError as e:
        fail(str(e))
    out.print(f"vLLM at {url} now serves {rec.version if rec else 'the base model'}")


@adapters_app.command("promote")
def adapters_promote(
    ctx: typer.Context,
    version: str,
    force: Annotated[
        bool, typer.Option(help="promote without a passing eval gate (noted in the record)")
    ] = False,
    vllm: VllmOpt = None,
) -> None:
    """Make VERSION the active adapter (it must have passed the eval gate, or --force)."""
    from tuner.registry import RegistryError

    try:
        rec = _registry(ctx).promote(version, force=force)
    except RegistryError as e:
        fail(str(e))
    out.print(f"active: {rec.version}")
    _reload(vllm, rec)


@adapters_app.command("rollback")
def adapters_rollback(ctx: typer.Context, vllm: VllmOpt = None) -> None:
    """Move the active pointer back to the previously active version (or the base model)."""
    from tuner.registry import RegistryError

    try:
        rec = _registry(ctx).rollback()
    except RegistryError as e:
        fail(str(e))
    out.print(f"active: {rec.version if rec else 'the base model'}")
    _reload(vllm, rec)


@adapters_app.command("diff")
def adapters_diff(ctx: typer.Context, v1: str, v2: str) -> None:
    """What differs between two versions: lineage, training config, metrics, evaluation."""
    from tuner.registry import RegistryError

    try:
        d = _registry(ctx).diff(v1, v2)
    except RegistryError as e:
        fail(str(e))
    table = Table(title=f"{v1} vs {v2}")
    for col in ("section", "key", v1, v2):
        table.add_column(col)
    for section, changes in d.items():
        for key, (a, b) in changes.items():
            table.add_row(section, key, _short(a), _short(b))
    if not table.rows:
        out.print(f"{v1} and {v2} have the same lineage, config, metrics and evaluation")
        return
    out.print(table)


def _short(x) -> str:
    text = x if isinstance(x, str) else json.dumps(x)
    return text if len(text) <= 60 else text[:57] + "..."


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
