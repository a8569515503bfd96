"""The eval gate: a candidate adapter replaces the active one only if it is measurably better.

    results = await evaluate_pair(cfg, "v3", "v2", ["calculator"], cfg.improve)
    gate(registry, "v3", *results, settings=cfg.tuner.gate, active="v2")

`evaluate_pair` plays the held-out episodes with both models in one run (same tasks, seeds and
sampling). `gate` is the one place a candidate is judged, recorded, promoted or rejected: the
improve job and `selftune gate` both end there. `decide` is its decision rule; it receives both
models' results with every episode's outcome, so a paired test (McNemar on the tasks where
the two disagree) can replace the rate comparison there without touching any caller.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from agent.config import Config, GateConfig, ImproveConfig
from agent.envs.run import SuiteResult, wilson_interval
from tools.errors import SelftuneError
from tuner.registry import Registry
from tuner.schemas import GateResult, Guard


class GateError(SelftuneError, ValueError):
    """The two evaluations cannot be compared; the message says why."""


# -- the rule ---------------------------------------------------------------------------------


def compare_rates(
    candidate: SuiteResult,
    active: SuiteResult,
    *,
    margin: float,
    guards: dict[str, Guard | tuple[float, float, float, bool]] | None = None,
) -> GateResult:
    """Promote iff candidate success rate >= active + margin and no guard regresses past its margin
    (the rate comparison `decide` applies to the pooled results).

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


# what makes two evaluations comparable: the same episodes, played the same way
_SAME = ("env", "split", "n", "seed", "temperature", "few_shot", "samples", "perturb")


def _check_comparable(candidate: SuiteResult, active: SuiteResult) -> None:
    """Both sides must have played the same episodes, or the comparison means nothing."""
    for field in _SAME:
        a, c = getattr(active, field), getattr(candidate, field)
        if a != c:
            raise GateError(
                f"the active and candidate evaluations differ in {field} ({a!r} vs {c!r}): "
                "evaluate both on the same split with the same seeds and sampling"
            )


def guards_from(
    candidate: Sequence[SuiteResult], active: Sequence[SuiteResult], *, guard_margin: float
) -> dict[str, Guard]:
    """Standard guards: the flag rate on every environment, and, when there are several,
    success on each of them."""
    by_env = {s.env: s for s in active}
    guards: dict[str, Guard] = {}
    for c in candidate:
        a = by_env.get(c.env)
        if a is None:
            raise GateError(f"the active model was not evaluated on {c.env!r}: evaluate both alike")
        _check_comparable(c, a)
        guards[f"flag_rate[{c.env}]"] = Guard(c.flag_rate, a.flag_rate, guard_margin, False)
        if len(candidate) > 1:
            guards[f"success_rate[{c.env}]"] = Guard(
                c.success_rate, a.success_rate, guard_margin, True
            )
    return guards


def pooled(results: Sequence[SuiteResult]) -> SuiteResult:
    """All environments' episodes as one result, task ids prefixed by their environment."""
    if len(results) == 1:
        return results[0]
    n = sum(r.n for r in results)
    wins = sum(r.successes for r in results)
    first = results[0]
    return first.model_copy(
        update={
            "env": "+".join(r.env for r in results),
            "run_id": "+".join(r.run_id for r in results),
            "n": n,
            "successes": wins,
            "success_rate": wins / n if n else 0.0,
            "ci95": wilson_interval(wins, n),
            "flag_rate": sum(r.flag_rate * r.n for r in results) / n if n else 0.0,
            "outcomes": [
                dataclasses.replace(o, task_id=f"{r.env}/{o.task_id}")
                for r in results
                for o in r.outcomes
            ],
        }
    )


@dataclasses.dataclass(frozen=True)
class PairedTest:
    """Candidate vs active on the same episodes: who won where the two disagree."""

    won: int  # episodes the candidate solved and the active model did not
    lost: int  # the other way round
    same: int  # both solved, or both failed
    p_value: float  # exact McNemar, one-sided: P(won >= observed | no difference)


def paired_test(candidate: SuiteResult, active: SuiteResult) -> PairedTest:
    """The exact McNemar test over the episodes both played (same task and sample).

    Only the discordant episodes carry information about which model is better; under "no
    difference" each is a fair coin, so the p-value is a binomial tail (scipy's binomtest).
    """
    from scipy.stats import binomtest

    mine = {(o.task_id, o.sample): o.success for o in candidate.outcomes}
    theirs = {(o.task_id, o.sample): o.success for o in active.outcomes}
    both = mine.keys() & theirs.keys()
    won = sum(1 for k in both if mine[k] and not theirs[k])
    lost = sum(1 for k in both if theirs[k] and not mine[k])
    p = binomtest(won, won + lost, 0.5, alternative="greater").pvalue if won + lost else 1.0
    return PairedTest(won, lost, len(both) - won - lost, float(p))


def by_kind(candidate: SuiteResult, active: SuiteResult) -> dict[str, dict[str, int]]:
    """Per task kind: the episodes the candidate won and lost against the active model."""
    theirs = {(o.task_id, o.sample): o.success for o in active.outcomes}
    out: dict[str, dict[str, int]] = {}
    for o in candidate.outcomes:
        row = out.setdefault(o.kind, {"won": 0, "lost": 0, "tasks": 0})
        row["tasks"] += 1
        other = theirs.get((o.task_id, o.sample))
        if other is None:
            continue
        row["won"] += int(o.success and not other)
        row["lost"] += int(other and not o.success)
    return dict(sorted(out.items()))


def decide(
    candidate: Sequence[SuiteResult], active: Sequence[SuiteResult], settings: GateConfig
) -> GateResult:
    """The gate's decision from both models' results on the same episodes, one per environment.

    The target is the success rate pooled over every environment's episodes, not the first
    environment's: the improve job trains on all of them at once, the pool weighs every
    episode alike and has the most episodes (the narrowest interval), and a single environment
    is its own pool. Each environment's success (when there are several) and flag rate are
    guards, so no environment may pay for another's gain beyond `guard_margin`.
    """
    if not candidate or len(candidate) != len(active):
        raise GateError(
            f"{len(candidate)} candidate and {len(active)} active evaluations: evaluate both "
            "models on the same environments"
        )
    by_env = {r.env: r for r in active}
    active = [by_env.get(c.env, a) for c, a in zip(candidate, active, strict=True)]
    mine, theirs = pooled(candidate), pooled(active)
    guards = guards_from(candidate, active, guard_margin=settings.guard_margin)
    if settings.test == "margin":
        result = compare_rates(mine, theirs, margin=settings.margin, guards=guards)
    else:
        result = _paired_decision(mine, theirs, settings, guards)
    result.by_kind = by_kind(mine, theirs)
    return result


def _paired_decision(
    mine: SuiteResult, theirs: SuiteResult, settings: GateConfig, guards: dict[str, Guard]
) -> GateResult:
    """Promote on a significant paired gain (and no guard past its margin)."""
    # the rate row is shown for reading; the decision on the target is the paired test's
    result = compare_rates(mine, theirs, margin=0.0, guards=guards)
    test = paired_test(mine, theirs)
    ok = test.won > test.lost and test.p_value <= settings.alpha
    key = f"success_rate[{mine.env}]"
    result.numbers[key]["ok"] = ok
    result.numbers[f"mcnemar_p[{mine.env}]"] = {
        "active": settings.alpha,
        "candidate": test.p_value,
        "delta": test.p_value - settings.alpha,
        "margin": 0.0,
        "higher_is_better": False,
        "ok": ok,
        "won": test.won,
        "lost": test.lost,
    }
    verdict = "significant" if ok else "not significant"
    result.reasons[0] = (
        f"{key} {theirs.success_rate:.3f} -> {mine.success_rate:.3f}: the candidate won "
        f"{test.won} and lost {test.lost} of {test.won + test.lost + test.same} paired episodes, "
        f"exact McNemar p = {test.p_value:.4f} ({verdict} at alpha {settings.alpha:g})"
    )
    result.promote = ok and all(row["ok"] for row in result.numbers.values())
    return result


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


# -- the step ---------------------------------------------------------------------------------


def gate(
    registry: Registry,
    candidate: str,
    candidate_results: Sequence[SuiteResult],
    active_results: Sequence[SuiteResult],
    *,
    settings: GateConfig,
    active: str | None,
    record: dict[str, Any] | None = None,
    console: Console | None = None,
) -> GateResult:
    """Decide, store every number in the registry, promote or reject, print the table.

    `active` is the version the candidate was evaluated against (None: the base model);
    `record` adds keys to the stored evaluation (the improve job's id, say)."""
    registry.get(candidate)
    result = decide(candidate_results, active_results, settings)
    result.candidate, result.active = candidate, active
    registry.record_eval(
        candidate,
        {
            "gate": result.model_dump(),
            "candidate": [r.to_dict() for r in candidate_results],
            "active": [r.to_dict() for r in active_results],
            "active_version": active,
            **(record or {}),
        },
    )
    if result.promote:
        registry.promote(candidate, result)
    else:
        registry.reject(candidate, result)
    (console or Console()).print(gate_table(result))
    if result.by_kind:
        (console or Console()).print(
            "by task kind (won/lost): "
            + ", ".join(f"{k} {v['won']}/{v['lost']}" for k, v in result.by_kind.items()),
            highlight=False,
        )
    return result


async def evaluate(
    cfg: Config,
    env: str,
    adapter: str | None,
    settings: ImproveConfig,
    *,
    few_shot: int = 0,
    agent: Any = None,
    tags: Sequence[str] = (),
    progress: bool = True,
) -> SuiteResult:
    """Held-out test split, greedy, fixed seed: what every model is judged on."""
    from agent.envs.run import run_suite

    return await run_suite(
        cfg,
        env,
        split="test",
        limit=settings.eval_limit,
        concurrency=settings.concurrency,
        adapter=adapter or "base",
        few_shot=few_shot,
        seed=settings.seed,
        max_tokens=settings.max_tokens,
        agent=agent,
        tags=[*tags, "eval"],
        progress=progress,
    )


async def evaluate_pair(
    cfg: Config,
    candidate: str,
    active: str | None,
    envs: Sequence[str],
    settings: ImproveConfig,
    *,
    agent: Any = None,
    tags: Sequence[str] = (),
    console: Console | None = None,
) -> tuple[list[SuiteResult], list[SuiteResult]]:
    """Candidate and active on the same held-out tasks, same seed and sampling, in one run."""
    from agent.agent import Agent

    console = console or Console(stderr=True)
    own = agent is None
    agent = agent or Agent(cfg, checkpoints=False)
    await agent.start()
    results: tuple[list[SuiteResult], list[SuiteResult]] = ([], [])
    try:
        for env in envs:
            console.print(
                f"[bold]gate[/bold] candidate {candidate} and active {active or 'base'} on {env}"
            )
            # both at once: their requests share batches (peft mixed-adapter rows)
            cand, act = await asyncio.gather(
                evaluate(cfg, env, candidate, settings, agent=agent, tags=tags),
                evaluate(cfg, env, active, settings, agent=agent, tags=tags, progress=False),
            )
            results[0].append(cand)
            results[1].append(act)
    finally:
        if own:
            await agent.aclose()
    return results


async def run_gate(
    cfg: Config,
    candidate: str,
    *,
    against: str = "active",
    envs: Sequence[str] | None = None,
    console: Console | None = None,
) -> GateResult:
    """`selftune gate`: evaluate `candidate` and `against` ("active", "base" or a version) on
    `envs` (default `[improve] envs`) as the improve job does, then `gate`."""
    from tuner.registry import open_registry

    registry = open_registry(cfg)
    registry.get(candidate)  # fail before spending time on episodes
    if against == "active":
        rec = registry.active()
        reference = rec.version if rec else None
    else:
        reference = None if against == "base" else registry.get(against).version
    if reference == candidate:
        raise GateError(f"{candidate} is the reference itself: gate it against another version")
    settings = cfg.improve
    results = await evaluate_pair(
        cfg, candidate, reference, envs or settings.envs, settings, console=console
    )
    return gate(
        registry,
        candidate,
        *results,
        settings=cfg.tuner.gate,
        active=reference,
        record={"command": "selftune gate"},
        console=console,
    )
