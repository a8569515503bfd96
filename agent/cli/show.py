"""The tables a person reads in the terminal after a command (the plots are `tuner/plots.py`)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def print_suite(result: Any, console: Console) -> None:
    """A SuiteResult as a small table plus one headline line."""
    lo, hi = result.ci95
    table = Table(title=f"{result.env} / {result.split}  (run {result.run_id})")
    for col in (
        "adapter",
        "tasks x samples",
        "success",
        "95% CI",
        "steps",
        "tokens",
        "s/episode",
        "flagged",
        "wall s",
    ):
        table.add_column(col, justify="right")
    table.add_row(
        result.adapter or "base",
        f"{result.n // max(result.samples, 1)} x {result.samples}",
        f"{result.success_rate:.1%} ({result.successes}/{result.n})",
        f"{lo:.1%}-{hi:.1%}",
        f"{result.mean_steps:.2f}",
        f"{result.mean_tokens:.0f}",
        f"{result.mean_wall_s:.2f}",
        f"{result.flag_rate:.1%}",
        f"{result.wall_s:.1f}",
    )
    console.print(table)
    errors = [o for o in result.outcomes if o.status != "ok"]
    if errors:
        kinds: dict[str, int] = {}
        for o in errors:
            kinds[o.status] = kinds.get(o.status, 0) + 1
        console.print(
            "episodes that did not finish: "
            + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
        )
    console.print(
        f"success rate {result.success_rate:.1%} (95% CI {lo:.1%}-{hi:.1%}) on {result.n} episodes"
    )


def print_checks(checks: list[Any], cfg: Any, console: Console) -> None:
    """`selftune doctor`'s checks as a table, then the model in use."""
    table = Table(title="selftune doctor", show_lines=False)
    for col in ("check", "ok", "detail"):
        table.add_column(col)
    for c in checks:
        table.add_row(c.name, "[green]yes[/green]" if c.ok else "[red]no[/red]", c.detail)
    console.print(table)
    console.print(f"model: {cfg.model.name}   backend: {cfg.model.backend}")


def print_robustness(results: dict[str, Any], console: Console) -> None:
    """Success clean and under each perturbation, with the gap to clean."""
    clean = results["clean"]
    table = Table(
        title=f"{clean.env} / {clean.split}: messy prompts  (adapter {clean.adapter or 'base'})"
    )
    for col in ("prompts", "success", "95% CI", "gap to clean"):
        table.add_column(col, justify="right" if col != "prompts" else "left")
    for name, r in results.items():
        lo, hi = r.ci95
        gap = r.success_rate - clean.success_rate
        table.add_row(
            name,
            f"{r.success_rate:.1%} ({r.successes}/{r.n})",
            f"{lo:.1%}-{hi:.1%}",
            "-" if name == "clean" else f"{gap:+.1%}",
        )
    console.print(table)
    gap, name = min((r.success_rate - clean.success_rate, n) for n, r in results.items())
    if gap < 0:
        console.print(f"largest gap: {name} {gap:+.1%}")
