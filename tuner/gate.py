"""The eval gate: a candidate adapter replaces the active one only if it is measurably better.

`decide` is the rule: the candidate's success rate must beat the active model's by at least
`margin`, and no guard metric (success on other environments, the reward-hacking flag rate...)
may get worse by more than its own margin. `gate` runs the whole step: evaluate the active
model and the candidate in the same run, decide, store every number in the registry, print the
table, and promote or reject.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tuner.registry import Registry
from tuner.schemas import EvalSummary, GateResult, Guard

Evaluate = Callable[[str | None], EvalSummary | Sequence[EvalSummary]]


class GateError(ValueError):
    """The two evaluations cannot be compared; the message says why."""


def decide(
    candidate: EvalSummary,
    active: EvalSummary,
    *,
    margin: float,
    guards: dict[str, Guard | tuple[float, float, float, bool]] | None = None,
) -> GateResult:
    """Promote iff candidate success rate >= active + margin and no guard regresses past its margin.

    `guards` maps a metric name to (candidate_value, active_value, margin, higher_is_better).
    Every number behind the decision is in the result's `numbers`, one row per metric.
    """
    _check_comparable(candidate, active)
    reasons: list[str] = []
    numbers: dict[str, dict[str, Any]] = {}

    delta = candidate.success_rate - active.success_rate
    ok = delta >= margin - 1e-12
    key = f"success_rate[{candidate.env}]"
    numbers[key] = _row(active.success_rate, candidate.success_rate, margin, True, ok)
    if ok:
        reasons.append(
            f"{key} improved by {delta:+.3f} (>= margin {margin:.3f}): "
            f"{active.success_rate:.3f} -> {candidate.success_rate:.3f}"
        )
    else:
        reasons.append(
            f"{key} changed by {delta:+.3f}, short of the margin {margin:.3f}: "
            f"{active.success_rate:.3f} -> {candidate.success_rate:.3f}"
        )
    all_ok = ok
    for name, g in (guards or {}).items():
        g = Guard(*g)
        # a guard regresses when it moves the wrong way by more than its margin
        worse_by = (g.active - g.candidate) if g.higher_is_better else (g.candidate - g.active)
        g_ok = worse_by <= g.margin + 1e-12
        numbers[name] = _row(g.active, g.candidate, g.margin, g.higher_is_better, g_ok)
        if not g_ok:
            all_ok = False
            reasons.append(
                f"guard {name} regressed by {worse_by:.3f} (> margin {g.margin:.3f}): "
                f"{g.active:.3f} -> {g.candidate:.3f}"
            )
    return GateResult(promote=all_ok, reasons=reasons, numbers=numbers)


def _row(active: float, candidate: float, margin: float, higher: bool, ok: bool) -> dict[str, Any]:
    return {
        "active": active,
        "candidate": candidate,
        "delta": candidate - active,
        "margin": margin,
        "higher_is_better": higher,
        "ok": ok,
    }


def _check_comparable(candidate: EvalSummary, active: EvalSummary) -> None:
    """Both sides must have played the same episodes, or the comparison means nothing."""
    for field in ("env", "split", "n", "seed", "sampling"):
        a, c = getattr(active, field), getattr(candidate, field)
        if a != c:
            raise GateError(
                f"the active and candidate evaluations differ in {field} ({a!r} vs {c!r}): "
                "evaluate both on the same split with the same seeds and sampling"
            )


def guards_from(
    candidate: Sequence[EvalSummary], active: Sequence[EvalSummary], *, guard_margin: float
) -> dict[str, Guard]:
    """Standard guards: the flag rate on every environment, and success on the others."""
    by_env = {s.env: s for s in active}
    guards: dict[str, Guard] = {}
    for i, c in enumerate(candidate):
        a = by_env.get(c.env)
        if a is None:
            raise GateError(f"the active model was not evaluated on {c.env!r}: evaluate both alike")
        _check_comparable(c, a)
        guards[f"flag_rate[{c.env}]"] = Guard(c.flag_rate, a.flag_rate, guard_margin, False)
        if i > 0:
            guards[f"success_rate[{c.env}]"] = Guard(
                c.success_rate, a.success_rate, guard_margin, True
            )
    return guards


def gate_table(result: GateResult) -> Table:
    """A rich table: metric, active, candidate, delta, margin, verdict."""
    verdict = "PROMOTE" if result.promote else "REJECT"
    title = f"eval gate: {result.candidate} vs {result.active or 'base'} -> {verdict}"
    table = Table(title=title)
    for col in ("metric", "active", "candidate", "delta", "margin", "verdict"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for name, row in result.numbers.items():
        direction = "" if row["higher_is_better"] else " (lower is better)"
        table.add_row(
            escape(name) + direction,  # '[env]' would read as rich markup
            f"{row['active']:.3f}",
            f"{row['candidate']:.3f}",
            f"{row['delta']:+.3f}",
            f"{row['margin']:.3f}",
            "[green]ok[/green]" if row["ok"] else "[red]fail[/red]",
        )
    return table


def gate(
    candidate_version: str,
    evaluate: Evaluate,
    registry: Registry,
    *,
    margin: float,
    guard_margin: float,
    console: Console | None = None,
) -> GateResult:
    """Evaluate the active model and the candidate in one run, decide, record, promote or reject.

    `evaluate(name)` plays the held-out episodes with adapter `name` (a version; None for the
    base model) and returns one EvalSummary per environment; the first is the target one.
    """
    registry.get(candidate_version)  # fail before spending time on episodes
    active_rec = registry.active()
    active_name = active_rec.version if active_rec else None
    if active_name == candidate_version:
        raise GateError(f"{candidate_version} is already active: train a new candidate first")
    active_sums = _as_list(evaluate(active_name), "active")
    cand_sums = _as_list(evaluate(candidate_version), "candidate")
    result = decide(
        cand_sums[0],
        next((s for s in active_sums if s.env == cand_sums[0].env), active_sums[0]),
        margin=margin,
        guards=guards_from(cand_sums, active_sums, guard_margin=guard_margin),
    )
    result.candidate, result.active = candidate_version, active_name
    registry.record_eval(
        candidate_version,
        {
            "gate": result.model_dump(),
            "candidate": [s.model_dump() for s in cand_sums],
            "active": [s.model_dump() for s in active_sums],
            "active_version": active_name,
        },
    )
    if result.promote:
        registry.promote(candidate_version, result)
    else:
        registry.reject(candidate_version, result)
    (console or Console()).print(gate_table(result))
    return result


def _as_list(x: EvalSummary | Sequence[EvalSummary], who: str) -> list[EvalSummary]:
    items = [x] if isinstance(x, EvalSummary) else list(x)
    if not items or not all(isinstance(s, EvalSummary) for s in items):
        raise GateError(
            f"evaluate() returned {x!r} for the {who} model: return EvalSummary objects"
        )
    return items
