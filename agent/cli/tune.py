"""`selftune tune ...` (train an adapter), `selftune gate VERSION` (the eval gate) and
`selftune adapters ...` (the registry).

Also `selftune improve`, the loop that collects, tunes, gates and promotes. Options that a
config section holds default to None: left out, they take the config's value.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.table import Table

from agent.cli.common import command_group, console, fail, get_config, out

tune_app = command_group("Train a LoRA adapter on a dataset folder.")
adapters_app = command_group("List, inspect, promote and roll back adapters.")

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
RouteOpt = Annotated[
    str | None,
    typer.Option(
        "--route",
        help="the route (an environment, a subagent role, any label) whose active adapter "
        "changes; without it, the global active (every route's fallback)",
    ),
]
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
            kind,
            dataset_dir,
            cfg,
            from_version=from_version,
            config=cfg.tuner.train.updated(max_steps=max_steps),
            resume=resume,
        )
    except (TrainError, RegistryError, ModelError, ValueError) as e:
        fail(str(e))
    out.print(
        f"registered [bold]{rec.version}[/bold] (candidate) at {rec.path}: "
        f"{rec.metrics['global_step']} steps, final loss {rec.metrics['last_loss']:.4f}. "
        f"Next: `selftune gate {rec.version}`."
    )


_TUNE_KINDS = {
    "sft": "Supervised fine-tuning on conversations (loss on assistant tokens only).",
    "dpo": "Direct preference optimization on chosen/rejected pairs.",
    "kto": "KTO on completions labelled good or bad.",
}


def _tune_command(kind: str):
    def command(
        ctx: typer.Context,
        dataset_dir: DatasetArg,
        from_version: FromOpt = None,
        config: ConfigOpt = None,
        resume: ResumeOpt = False,
        max_steps: StepsOpt = None,
    ) -> None:
        _run_tune(ctx, kind, dataset_dir, from_version, config, resume, max_steps)

    command.__doc__ = _TUNE_KINDS[kind]
    command.__name__ = f"tune_{kind}"
    return command


for _kind in _TUNE_KINDS:  # `selftune tune sft|dpo|kto DATASET`: one command, three kinds
    tune_app.command(_kind)(_tune_command(_kind))


@tune_app.command("cpt")
def tune_cpt(
    ctx: typer.Context,
    corpus_dir: Annotated[
        Path, typer.Argument(help="folder of documents (.md, .txt, .html), or a CPT dataset")
    ],
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="where the dataset goes (default: datasets/cpt-<folder name>)"),
    ] = None,
    from_version: FromOpt = None,
    config: ConfigOpt = None,
    resume: ResumeOpt = False,
    max_steps: StepsOpt = None,
) -> None:
    """Continued pre-training: a causal LM loss on a corpus's text, chunked, packed, scrubbed."""
    from tuner.cpt import CorpusError, build_corpus_dataset

    cfg = get_config(ctx, config)
    dataset = corpus_dir
    if not (corpus_dir / "manifest.json").is_file():  # documents: build the dataset first
        dataset = out_dir or cfg.workspace.datasets / f"cpt-{corpus_dir.resolve().name}"
        try:
            res = build_corpus_dataset(
                corpus_dir, dataset, scrub_patterns=cfg.traces.scrub_patterns
            )
        except CorpusError as e:
            fail(str(e))
        out.print(f"CPT dataset: {res.rows} chunks of {corpus_dir} in {res.path}")
    _run_tune(ctx, "cpt", dataset, from_version, config, resume, max_steps)


@tune_app.command("grpo")
def tune_grpo(
    ctx: typer.Context,
    env: Annotated[str, typer.Argument(help="environment: built-in name or folder")],
    from_version: Annotated[
        str | None,
        typer.Option("--from", help="start from this version (default: the active one; 'base')"),
    ] = None,
    group_size: Annotated[
        int | None,
        typer.Option(help="episodes per task per step, G (default: tuner.grpo.group_size)"),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="policy updates (default: tuner.grpo.steps)")
    ] = None,
    tasks_per_step: Annotated[
        int | None, typer.Option(help="train tasks per step (default: tuner.grpo.tasks_per_step)")
    ] = None,
    temperature: Annotated[
        float | None,
        typer.Option(help="rollout sampling temperature (default: tuner.grpo.temperature)"),
    ] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option(help="max new tokens per model turn (default: tuner.grpo.max_tokens)"),
    ] = None,
    learning_rate: Annotated[
        float | None,
        typer.Option("--lr", help="AdamW learning rate (default: tuner.grpo.learning_rate)"),
    ] = None,
    beta: Annotated[
        float | None,
        typer.Option(help="KL penalty to the starting adapter (default: tuner.grpo.beta)"),
    ] = None,
    judge: Annotated[
        str | None,
        typer.Option(
            metavar="base|teacher|off",
            help="mix in the group judge's ranking, RULER-style: base the base model, teacher the [teacher] model (default: tuner.grpo.judge)",
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="task order and sampling seed (default: tuner.grpo.seed)")
    ] = None,
    rollout_engine: Annotated[
        str | None,
        typer.Option(
            help="agent: the agent's backend; vllm: a vLLM server of the run's own serving the "
            "merged policy (default: tuner.grpo.rollout_engine)"
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

    cfg = get_config(ctx, config)
    try:
        grpo_config = cfg.tuner.grpo.updated(
            steps=steps,
            group_size=group_size,
            tasks_per_step=tasks_per_step,
            temperature=temperature,
            max_tokens=max_tokens,
            learning_rate=learning_rate,
            beta=beta,
            judge=judge,
            seed=seed,
            rollout_engine=rollout_engine,
        )
        rec = asyncio.run(
            grpo(cfg, env, grpo_config, start_from=from_version, resume=resume, console=console)
        )
    except (GrpoError, RegistryError, ModelError, VllmError, ValueError) as e:
        fail(str(e))
    out.print(
        f"registered [bold]{rec.version}[/bold] (candidate) at {rec.path} after "
        f"{rec.metrics['steps']} GRPO steps. Next: `selftune gate {rec.version}`."
    )


def gate(
    ctx: typer.Context,
    version: Annotated[str, typer.Argument(help="the candidate version (e.g. v3)")],
    against: Annotated[
        str, typer.Option(help="the reference: 'active' (the base model if none), 'base' or vN")
    ] = "active",
    envs: Annotated[
        list[str] | None,
        typer.Option(
            "--env", help="environment to evaluate on, repeatable (default: improve.envs)"
        ),
    ] = None,
    eval_limit: Annotated[
        int | None,
        typer.Option(help="held-out test tasks per environment (default: improve.eval_limit)"),
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option(help="episodes at once per model (default: improve.concurrency)")
    ] = None,
    route: Annotated[
        str | None,
        typer.Option(
            "--route",
            help="decide for this route alone: against what answers it today, on its "
            "environments (default: the route itself), promoting on the route only",
        ),
    ] = None,
) -> None:
    """The eval gate: evaluate VERSION and the reference on the same held-out tasks and the
    guards ([tuner.gate]: the general probe, environments earlier promotions passed on,
    perturbed prompts), then promote VERSION or reject it, naming the guard that blocked it;
    the decision and every number go into the registry. With --route the decision and the
    promotion are that route's."""
    from agent.model.files import ModelError
    from tuner.gate import GateError, run_gate
    from tuner.registry import RegistryError
    from tuner.reload import ReloadError

    cfg = get_config(ctx)
    try:
        cfg.improve = cfg.improve.updated(eval_limit=eval_limit, concurrency=concurrency)
        result = asyncio.run(
            run_gate(cfg, version, against=against, envs=envs, console=console, route=route)
        )
    except (GateError, RegistryError, ModelError, ReloadError, ValueError) as e:
        fail(str(e))
    where = f"active on route {route}" if route else "active"
    verdict = f"promoted: now {where}" if result.promote else "rejected"
    if result.blocked_by:
        verdict += f" (blocked by {'; '.join(result.blocked_by)})"
    on = f" on route {route}" if route else ""
    out.print(f"{version} vs {result.active or 'the base model'}{on}: {verdict}", markup=False)


def _when(t: float) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")


@adapters_app.command("list")
def adapters_list(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="the records as a JSON list")] = False,
) -> None:
    """Every version with its status, lineage and training result."""
    reg = _registry(ctx)
    if as_json:
        typer.echo(json.dumps([r.model_dump(mode="json") for r in reg.list()], indent=2))
        return
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
    routes = reg.routes()
    if routes:
        fallback = "the global active"
        out.print(
            "routes: " + ", ".join(f"{n} -> {v or fallback}" for n, v in routes.items()),
            highlight=False,
        )


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
    route: RouteOpt = None,
    vllm: VllmOpt = None,
) -> None:
    """Make VERSION the active adapter, or with --route the active adapter of that route
    (it must have passed the eval gate, or --force)."""
    from tuner.registry import RegistryError

    try:
        rec = _registry(ctx).promote(version, force=force, route=route)
    except RegistryError as e:
        fail(str(e))
    if route is not None:  # served by version name: vLLM loads it on the first routed request
        out.print(f"route {route}: {rec.version}")
        return
    out.print(f"active: {rec.version}")
    _reload(vllm, rec)


@adapters_app.command("rollback")
def adapters_rollback(ctx: typer.Context, route: RouteOpt = None, vllm: VllmOpt = None) -> None:
    """Move the active pointer back to the previously active version (or the base model);
    with --route, that route's pointer (back to none: the route falls back to the global)."""
    from tuner.registry import RegistryError

    try:
        rec = _registry(ctx).rollback(route=route)
    except RegistryError as e:
        fail(str(e))
    if route is not None:
        out.print(f"route {route}: {rec.version if rec else 'none (the global active answers)'}")
        return
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
        list[str] | None, typer.Argument(help="environments (default: improve.envs)")
    ] = None,
    cycles: Annotated[
        int | None, typer.Option(help="improvement cycles to run (default: improve.cycles)")
    ] = None,
    method: Annotated[
        str | None, typer.Option(help="sft, dpo, kto or grpo, online RL (default: improve.method)")
    ] = None,
    budget_minutes: Annotated[
        float | None,
        typer.Option(help="start no new cycle after this (default: improve.budget_minutes)"),
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
    collect_limit: Annotated[
        int | None,
        typer.Option(help="train tasks per environment per cycle (default: improve.collect_limit)"),
    ] = None,
    eval_limit: Annotated[
        int | None,
        typer.Option(help="held-out test tasks per environment (default: improve.eval_limit)"),
    ] = None,
    few_shot: Annotated[
        int | None,
        typer.Option(
            help="demonstrations while collecting, while the model is weak (default: improve.few_shot)"
        ),
    ] = None,
    hints: Annotated[
        bool | None,
        typer.Option(
            help="a collection wave with the tasks' hints, where they have any (default: improve.hints)"
        ),
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(
            help="episodes at once, batched by the local backend (default: improve.concurrency)"
        ),
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option(help="max new tokens per model call (default: improve.max_tokens)")
    ] = None,
    max_train_steps: Annotated[
        int | None,
        typer.Option(
            help="cap on training steps; -1: tuner.train.epochs decide, grpo: tuner.grpo.steps (default: improve.max_train_steps)"
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="sampling seed of sample 0 (default: improve.seed)")
    ] = None,
    source: Annotated[
        str | None,
        typer.Option(
            help="envs: play the environments' train tasks; traffic: learn from what `selftune serve` recorded; both: the two in one cycle (default: improve.source)"
        ),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            help="--source traffic: only traffic since 7d, 12h, 2026-05-01 (default: all)"
        ),
    ] = None,
    judge: Annotated[
        str | None,
        typer.Option(
            metavar="base|teacher|off",
            help="--source traffic: the LLM judge grades questions that match no environment task: base the base model, teacher the [teacher] model (default: improve.judge)",
        ),
    ] = None,
    weak_labels: Annotated[
        bool | None,
        typer.Option(
            help="--source traffic --method kto: a question asked again or a failed tool call labels the answer it points at False (default: improve.weak_labels)"
        ),
    ] = None,
    traffic_replay: Annotated[
        bool | None,
        typer.Option(
            help="--source traffic|both: play each question whose served answer missed a known good answer again; a right episode through the tools becomes its row, and a bare correction to a question that needs a tool is not trained on (default: improve.traffic_replay)"
        ),
    ] = None,
    routes: Annotated[
        str | None,
        typer.Option(
            help="global: one adapter for every environment; per-env: each environment its own cycles and adapter, promoted on its own route (default: improve.routes)"
        ),
    ] = None,
) -> None:
    """Collect, grade, build a dataset, tune, gate, promote and reload: the self-improvement loop.
    With --source traffic a cycle learns from served traffic and people's feedback (--judge base
    or --judge teacher grades what no task matches), and the gate adds a held-out slice of the traffic to the environments'
    tests; --source both learns from the environments' train tasks and the traffic at once."""
    from agent.model.files import ModelError
    from agent.serving.vllm import VllmError
    from tuner.gate import GateError
    from tuner.grpo import GrpoError
    from tuner.improve import ImproveError, parse_every
    from tuner.improve import improve as run_improve
    from tuner.registry import RegistryError
    from tuner.train import TrainError

    cfg = get_config(ctx)
    try:
        settings = cfg.improve.updated(
            envs=list(envs) if envs else None,
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
            source=source,
            since=since,
            judge=judge,
            weak_labels=weak_labels,
            traffic_replay=traffic_replay,
            routes=routes,
        )
        every_s = parse_every(every) if every else None
        asyncio.run(run_improve(cfg, settings, every_s=every_s, resume=resume, console=console))
    # errors whose message says what to do (run `selftune setup`, say): one line, no traceback
    except (
        ImproveError, ModelError, GateError, GrpoError, RegistryError, TrainError, VllmError
    ) as e:  # fmt: skip
        fail(str(e))
    except ValidationError as e:  # an option out of range: [improve]'s validation says which
        fail(_option_error(e))


def _option_error(err: ValidationError) -> str:
    """A pydantic error about a section built from options, as the options' names."""
    return "; ".join(
        f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')} {e.get('input')!r}: {e['msg']}"
        for e in err.errors()
    )
