"""`selftune router ...`: fit the route classifier on the traces, and ask which route a prompt
takes (agent/model/router.py)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from agent.cli.common import command_group, console, fail, get_config, out

router_app = command_group("Fit and query the route classifier of routed adapters.")


@router_app.command("fit")
def router_fit(
    ctx: typer.Context,
    routes: Annotated[
        str | None,
        typer.Option(
            help="comma-separated routes to learn (default: every environment and subagent "
            "role in the traces)"
        ),
    ] = None,
    heldout: Annotated[
        float, typer.Option(help="share of each route's prompts held out to measure it")
    ] = 0.2,
    limit: Annotated[
        int | None, typer.Option(help="read at most this many traces, newest first")
    ] = None,
) -> None:
    """Fit the route classifier on the traces' task prompts, print its held-out accuracy, and
    save it as <workspace>/router.json."""
    from agent.model.router import RouterError, fit_router

    if not 0.0 < heldout < 1.0:
        fail(f"--heldout {heldout} must be between 0 and 1 (a share, like 0.2)")
    cfg = get_config(ctx)
    wanted = [r.strip() for r in routes.split(",") if r.strip()] if routes else None
    console.print("embedding the traces' prompts with MiniLM ...")
    try:
        clf = fit_router(cfg, routes=wanted, heldout_share=heldout, limit=limit)
    except RouterError as e:
        fail(str(e))
    _print(clf)
    out.print(f"saved {cfg.workspace.router}")


@router_app.command("show")
def router_show(ctx: typer.Context) -> None:
    """The saved classifier: its routes, training counts and held-out accuracy."""
    from agent.model.router import RouterError, load

    cfg = get_config(ctx)
    try:
        clf = load(cfg.workspace.router)
    except RouterError as e:
        fail(str(e))
    if clf is None:
        fail(f"no router at {cfg.workspace.router}: fit one with `selftune router fit`")
    _print(clf)


@router_app.command("which")
def router_which(
    ctx: typer.Context,
    prompt: str,
    route: Annotated[str | None, typer.Option(help="an explicit route")] = None,
    env: Annotated[str | None, typer.Option(help="the request's environment")] = None,
) -> None:
    """Which route and adapter a request would get, as JSON."""
    from agent.model.router import RouterError, choose, load

    cfg = get_config(ctx)
    try:
        decision = choose(
            cfg, route=route, env=env, text=prompt, classifier=load(cfg.workspace.router)
        )
    except RouterError as e:
        fail(str(e))
    out.print_json(json.dumps({"adapter": decision.adapter, **decision.as_metadata()}))


def _print(clf) -> None:
    h = clf.heldout
    table = Table(title="route classifier (nearest centroid on MiniLM)")
    for col in ("route", "train prompts", "held-out accuracy"):
        table.add_column(col)
    for label in clf.labels:
        acc = h.get("per_route", {}).get(label)
        table.add_row(label, str(clf.counts.get(label, 0)), "-" if acc is None else f"{acc:.3f}")
    out.print(table)
    if h.get("accuracy") is not None:
        lo, hi = h["ci95"]
        out.print(
            f"held-out accuracy {h['accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f}, n={h['n']}; "
            f"chance {h['chance']:.3f})"
        )
