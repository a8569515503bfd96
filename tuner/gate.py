"""The eval gate: a candidate adapter replaces the active one only if it is measurably better
and breaks nothing it is guarded on.

    result, cand, act = await evaluate_and_gate(cfg, registry, "v3", "v2", ["calculator"],
                                                cfg.improve)

`evaluate_and_gate` is the one path (the improve job and `selftune gate`): it finds the
guard-only environments (the general-ability probe, every environment an earlier promotion
was gated on), plays the held-out episodes with both models in one run (`evaluate_pair`: same
tasks, seeds and sampling, plus perturbed copies for the robustness guard), then `gate`, the
one place a candidate is judged, recorded, promoted or rejected. `decide` is its rule: a
significant paired gain (exact McNemar) on the job's own environments, and no guard past its
own margin; the result names the guards that blocked it.

With a `route` (`selftune gate V --route docs-qa`, `selftune improve --routes per-env`) the
same path decides for one route of the registry: the reference is the adapter that answers
that route today (`Registry.active_for`), the guards are the route's own, and a pass promotes
on the route, never the global pointer (see `evaluate_and_gate`).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from agent.config import Config, GateConfig, ImproveConfig
from agent.envs.run import SuiteResult, wilson_interval
from agent.model.adapters import check_route
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
    numbers[key] = _row(active.success_rate, candidate.success_rate, margin, True, ok, "target")
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
    blocked: list[str] = []
    for name, g in (guards or {}).items():
        g = Guard(*g)
        # a guard regresses when it moves the wrong way by more than its margin
        worse_by = (g.active - g.candidate) if g.higher_is_better else (g.candidate - g.active)
        g_ok = worse_by <= g.margin + 1e-12
        numbers[name] = _row(g.active, g.candidate, g.margin, g.higher_is_better, g_ok, g.kind)
        if not g_ok:
            all_ok = False
            blocked.append(f"{g.kind}: {name}")
            reasons.append(
                f"blocked by the {g.kind} guard: {name} regressed by {worse_by:.3f} "
                f"(> margin {g.margin:.3f}): {g.active:.3f} -> {g.candidate:.3f}"
            )
    return GateResult(promote=all_ok, reasons=reasons, numbers=numbers, blocked_by=blocked)


def _row(
    active: float, candidate: float, margin: float, higher: bool, ok: bool, guard: str = "guard"
) -> dict[str, Any]:
    return {
        "active": active,
        "candidate": candidate,
        "delta": candidate - active,
        "margin": margin,
        "higher_is_better": higher,
        "ok": ok,
        "guard": guard,
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
    candidate: Sequence[SuiteResult],
    active: Sequence[SuiteResult],
    settings: GateConfig,
    *,
    guard_envs: Mapping[str, str] | None = None,
) -> dict[str, Guard]:
    """Every guard, each with its own margin from `settings` ([tuner.gate]):

    - success on each guard-only environment (`guard_envs`: name -> "probe" or "promoted"):
      `probe_margin` for the general-ability probe, `guard_margin` for the others;
    - success on each of the job's environments when there are several (`guard_margin`), so
      none pays for another's gain;
    - the reward-hacking flag rate (`flag_margin`) and the grounded rate (`grounded_margin`)
      on every environment;
    - the robustness gap (clean minus perturbed success, `robustness_margin`) on each
      environment with perturbed results (`perturb` set) on both sides.

    Each is a margin on the rate, not a significance test (see GateConfig for why).
    """
    guard_envs = dict(guard_envs or {})
    clean = [c for c in candidate if c.perturb is None]
    theirs = {(a.env, a.perturb): a for a in active}
    own = [c for c in clean if c.env not in guard_envs]
    guards: dict[str, Guard] = {}
    for c in clean:
        a = theirs.get((c.env, None))
        if a is None:
            raise GateError(f"the active model was not evaluated on {c.env!r}: evaluate both alike")
        _check_comparable(c, a)
        kind = guard_envs.get(c.env)
        if kind is not None or len(own) > 1:
            margin = settings.probe_margin if kind == "probe" else settings.guard_margin
            guards[f"success_rate[{c.env}]"] = Guard(
                c.success_rate, a.success_rate, margin, True, kind or "env"
            )
        guards[f"flag_rate[{c.env}]"] = Guard(
            c.flag_rate, a.flag_rate, settings.flag_margin, False, "flags"
        )
        mine_g, theirs_g = grounded(c), grounded(a)
        if mine_g is not None and theirs_g is not None:
            guards[f"grounded_rate[{c.env}]"] = Guard(
                mine_g, theirs_g, settings.grounded_margin, True, "grounded"
            )
        shaken = [p for p in candidate if p.env == c.env and p.perturb is not None]
        if shaken:
            others = [theirs.get((p.env, p.perturb)) for p in shaken]
            if any(o is None for o in others):
                raise GateError(
                    f"the active model was not evaluated on perturbed {c.env!r}: evaluate both alike"
                )
            for p, o in zip(shaken, others, strict=True):
                _check_comparable(p, o)
            guards[f"robustness_gap[{c.env}]"] = Guard(
                robustness_gap(c, shaken),
                robustness_gap(a, others),
                settings.robustness_margin,
                False,
                "robustness",
            )
    return guards


def grounded(result: SuiteResult) -> float | None:
    """The share of right answers not flagged `ungrounded` (traces.flags.grounded_rate on the
    episodes' grades); None when no answer is right."""
    from traces.flags import grounded_rate
    from traces.schemas import Grade

    return grounded_rate(
        Grade(trace_id=o.trace_id, value=o.score, source="verifier", grader="gate", flags=o.flags)
        for o in result.outcomes
    )


def robustness_gap(clean: SuiteResult, perturbed: Sequence[SuiteResult]) -> float:
    """Clean minus perturbed success on the episodes the perturbed runs played (a subset of
    the clean run's: the first tasks of the same split, same seeds), averaged over the
    perturbations. Positive: messy prompts cost the model that much."""
    played = {(o.task_id, o.sample) for p in perturbed for o in p.outcomes}
    base = [o.success for o in clean.outcomes if (o.task_id, o.sample) in played]
    if not base:
        raise GateError(
            f"the perturbed runs of {clean.env!r} played none of the clean run's tasks: run "
            "them on the first tasks of the same split"
        )
    shaken = sum(p.success_rate for p in perturbed) / len(perturbed)
    return sum(base) / len(base) - shaken


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
    candidate: Sequence[SuiteResult],
    active: Sequence[SuiteResult],
    settings: GateConfig,
    guard_envs: Mapping[str, str] | None = None,
) -> GateResult:
    """The gate's decision from both models' results on the same episodes.

    `candidate` and `active` hold one clean result per environment, plus perturbed results
    (`perturb` set) for the robustness guard. `guard_envs` (name -> guard kind) are judged only
    as guards: the general-ability probe and the environments earlier promotions were gated on.

    The target is the success rate pooled over the job's own environments' clean episodes,
    not the first environment's: the improve job trains on all of them at once, the pool weighs
    every episode alike and has the most episodes (the narrowest interval), and a single
    environment is its own pool. Everything else is a guard (`guards_from`), each with its
    own margin; the result names every guard that blocked promotion (`blocked_by`).
    """
    guard_envs = dict(guard_envs or {})
    if not candidate or len(candidate) != len(active):
        raise GateError(
            f"{len(candidate)} candidate and {len(active)} active evaluations: evaluate both "
            "models on the same environments"
        )
    by_env = {(r.env, r.perturb): r for r in active}
    active = [by_env.get((c.env, c.perturb), a) for c, a in zip(candidate, active, strict=True)]
    mine_own = [r for r in candidate if r.perturb is None and r.env not in guard_envs]
    theirs_own = [r for r in active if r.perturb is None and r.env not in guard_envs]
    if not mine_own:
        raise GateError(
            "every evaluated environment is a guard: the gate needs the job's own environments "
            "to judge the candidate on"
        )
    mine, theirs = pooled(mine_own), pooled(theirs_own)
    guards = guards_from(candidate, active, settings, guard_envs=guard_envs)
    if settings.test == "margin":
        result = compare_rates(mine, theirs, margin=settings.margin, guards=guards)
    else:
        result = _paired_decision(mine, theirs, settings, guards)
    result.by_kind = by_kind(mine, theirs)
    result.guard_envs = guard_envs
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
        "guard": "target",
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
    """A rich table: metric, guard (its kind, "target" for the decision's own), active,
    candidate, delta, margin, verdict."""
    verdict = "PROMOTE" if result.promote else "REJECT"
    on = f" on route {result.route}" if result.route else ""
    title = f"eval gate{on}: {result.candidate} vs {result.active or 'base'} -> {verdict}"
    table = Table(title=title)
    for col in ("metric", "guard", "active", "candidate", "delta", "margin", "verdict"):
        table.add_column(col, justify="left" if col in ("metric", "guard") else "right")
    for name, row in result.numbers.items():
        direction = "" if row["higher_is_better"] else " (lower is better)"
        table.add_row(
            escape(name) + direction,  # '[env]' would read as rich markup
            row.get("guard", "guard"),
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
    guard_envs: Mapping[str, str] | None = None,
    envs: Sequence[str] | None = None,
    record: dict[str, Any] | None = None,
    console: Console | None = None,
    route: str | None = None,
) -> GateResult:
    """Decide, store every number in the registry, promote or reject, print the table.

    `active` is the version the candidate was evaluated against (None: the base model);
    `guard_envs` the environments judged only as guards (`decide`); `envs` the job's own
    environments as given (names or folders), kept in the record so that later candidates are
    guarded on them once this one is promoted; `record` adds keys to the stored evaluation
    (the improve job's id, say); `route`: the decision is for that route alone, stored with
    it, and a pass promotes on it (`Registry.promote(route=...)`), never globally."""
    registry.get(candidate)
    result = decide(candidate_results, active_results, settings, guard_envs)
    result.candidate, result.active, result.route = candidate, active, route
    own = [r.env for r in candidate_results if r.perturb is None and r.env not in result.guard_envs]
    registry.record_eval(
        candidate,
        {
            "gate": result.model_dump(),
            "envs": list(envs) if envs is not None else own,
            "guard_envs": dict(result.guard_envs),
            "candidate": [r.to_dict() for r in candidate_results],
            "active": [r.to_dict() for r in active_results],
            "active_version": active,
            "route": route,
            **(record or {}),
        },
    )
    if result.promote:
        registry.promote(candidate, result, route=route)
    else:
        registry.reject(candidate, result, route=route)
    console = console or Console()
    console.print(gate_table(result))
    if result.by_kind:
        console.print(
            "by task kind (won/lost): "
            + ", ".join(f"{k} {v['won']}/{v['lost']}" for k, v in result.by_kind.items()),
            highlight=False,
        )
    if result.blocked_by:
        console.print("blocked by: " + "; ".join(result.blocked_by), markup=False)
    return result


def promoted_envs(registry: Registry, route: str | None = None) -> dict[str, list[str]]:
    """Every environment an active or earlier-promoted (retired) adapter was gated on, as the
    gate was given it (name or folder) -> those versions. Read from the records' passing gate
    evaluations; a forced promotion was gated on nothing. Without `route`: the global
    pointer's adapters and their global gates; with it: the versions ever promoted on that
    route (`Registry.promoted_on`) and their gates on that route."""
    out: dict[str, list[str]] = {}
    records = registry.list()
    if route is None:
        records = [r for r in records if r.status in ("active", "retired")]
    else:
        on = set(registry.promoted_on(route))
        records = [r for r in records if r.version in on]
    for rec in records:
        passed = [
            e
            for e in rec.eval_results
            if e.get("gate", {}).get("promote") and e.get("route") == route
        ]
        if not passed:
            continue
        last = passed[-1]
        skip = last.get("guard_envs") or {}
        envs = last.get("envs") or [  # records from before "envs" was kept
            r["env"]
            for r in last.get("candidate", [])
            if not r.get("perturb") and r["env"] not in skip
        ]
        for env in envs:
            out.setdefault(env, []).append(rec.version)
    return out


def guard_envs_for(
    settings: GateConfig,
    registry: Registry,
    envs: Sequence[str],
    console: Console | None = None,
    route: str | None = None,
) -> dict[str, str]:
    """The guard-only environments of a gate on `envs` (as given) -> their kind: the probe
    ("probe"), then the environments earlier promotions were gated on ("promoted"; on
    `route`: earlier promotions on that route), less the job's own. One that can no longer be
    found is skipped, and said so."""
    from agent.envs import EnvironmentLoadError, resolve_environment_path

    out: dict[str, str] = {}
    if settings.probe and settings.probe not in envs:
        out[settings.probe] = "probe"
    if settings.promoted_envs:
        for env, versions in promoted_envs(registry, route).items():
            if env in envs or env in out:
                continue
            try:
                resolve_environment_path(env)
            except EnvironmentLoadError:
                (console or Console(stderr=True)).print(
                    f"[yellow]gate: {env!r}, which {', '.join(versions)} passed the gate on, is "
                    "gone: not guarded[/yellow]"
                )
                continue
            out[env] = "promoted"
    return out


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
    limit: int | None = None,
    perturb: str | None = None,
) -> SuiteResult:
    """Held-out test split, greedy, fixed seed: what every model is judged on (`limit` test
    tasks, default `eval_limit`; `perturb`: the prompts as that perturbation writes them)."""
    from agent.envs.run import run_suite

    return await run_suite(
        cfg,
        env,
        split="test",
        limit=limit or settings.eval_limit,
        concurrency=settings.concurrency,
        adapter=adapter or "base",
        few_shot=few_shot,
        seed=settings.seed,
        max_tokens=settings.max_tokens,
        agent=agent,
        tags=[*tags, "eval"],
        progress=progress,
        perturb=perturb,
    )


async def evaluate_pair(
    cfg: Config,
    candidate: str,
    active: str | None,
    envs: Sequence[str],
    settings: ImproveConfig,
    *,
    guards: Sequence[str] = (),
    gate: GateConfig | None = None,
    agent: Any = None,
    tags: Sequence[str] = (),
    console: Console | None = None,
    extra: Sequence[Any] = (),
) -> tuple[list[SuiteResult], list[SuiteResult]]:
    """Candidate and active on the same held-out tasks, same seed and sampling, in one run:
    `envs` then the guard-only `guards`, clean; then, for the robustness guard, the first
    `gate.robustness_limit` tasks of each of `envs` under each of `gate.robustness`; last the
    in-memory environments `extra` (every test task, clean: the held-out traffic slice)."""
    from agent.agent import Agent

    console = console or Console(stderr=True)
    own = agent is None
    agent = agent or Agent(cfg, checkpoints=False)
    await agent.start()
    results: tuple[list[SuiteResult], list[SuiteResult]] = ([], [])
    runs: list[tuple[str, str | None, int | None]] = [(e, None, None) for e in [*envs, *guards]]
    if gate is not None:
        limit = min(gate.robustness_limit, settings.eval_limit)
        runs += [(e, p, limit) for e in envs for p in gate.robustness]
    runs += [(e, None, len(e.split("test"))) for e in extra]
    try:
        for env, perturb, limit in runs:
            how = f" ({perturb}, {limit} tasks)" if perturb else ""
            role = " (guard)" if env in guards else ""
            name = env if isinstance(env, str) else env.name
            console.print(
                f"[bold]gate[/bold] candidate {candidate} and active {active or 'base'} on "
                f"{name}{role}{how}"
            )
            # both at once: their requests share batches (peft mixed-adapter rows)
            cand, act = await asyncio.gather(
                evaluate(cfg, env, candidate, settings, agent=agent, tags=tags, limit=limit,
                         perturb=perturb),
                evaluate(cfg, env, active, settings, agent=agent, tags=tags, progress=False,
                         limit=limit, perturb=perturb),
            )  # fmt: skip
            results[0].append(cand)
            results[1].append(act)
    finally:
        if own:
            await agent.aclose()
    return results


async def evaluate_and_gate(
    cfg: Config,
    registry: Registry,
    candidate: str,
    active: str | None,
    envs: Sequence[str],
    settings: ImproveConfig,
    *,
    agent: Any = None,
    tags: Sequence[str] = (),
    record: dict[str, Any] | None = None,
    console: Console | None = None,
    extra: Sequence[Any] = (),
    route: str | None = None,
) -> tuple[GateResult, list[SuiteResult], list[SuiteResult]]:
    """The one path from a candidate to a decision (the improve job and `selftune gate`):
    find the guard environments, evaluate both models on `envs`, the guards and the perturbed
    prompts (`evaluate_pair`), then `gate`. Returns the result and both sides' evaluations.
    `extra`: in-memory environments (agent.envs.Environment) whose test tasks join the target
    pool with `envs` (the improve job's held-out traffic slice); they are not recorded as
    environments later promotions are guarded on.

    `route`: the decision is for that route of the registry alone. The caller passes as
    `active` what answers the route today (`Registry.active_for(route)`: its own adapter, else
    the global one, else the base, as the router would), and as `envs` the route's
    environments. A pass promotes the candidate on the route, never the global pointer. The
    guards are the route's own, not the other routes':
    - the route's environments (each a guard of its own when there are several), with the
      flag, grounded and robustness guards on them, as for a global gate;
    - the general-ability probe: a route's requests are not all in its environment's
      distribution (the classifier sends a misrouted or off-topic prompt to it when it is
      confident enough, and an explicit route gets whatever its caller sends), so the expert
      must stay a general model;
    - the environments earlier promotions on this route were gated on (its own history).
    Another route's environments are no guard: the candidate never answers that route's
    requests (each route keeps its own adapter, and a route without one the global active),
    so its score there says nothing about what anyone gets; guarding on it would only block
    experts for not being generalists, which is what routing exists to avoid."""
    if route is not None:
        check_route(route)
    gate_settings = cfg.tuner.gate
    guards = guard_envs_for(gate_settings, registry, envs, console, route)
    cand, act = await evaluate_pair(
        cfg, candidate, active, envs, settings, guards=list(guards), gate=gate_settings,
        agent=agent, tags=tags, console=console, extra=extra,
    )  # fmt: skip
    # the results come in order (envs, then guards): the guards' names as their runs say them
    n = len(envs)
    names = {
        r.env: kind for r, kind in zip(cand[n : n + len(guards)], guards.values(), strict=True)
    }
    result = gate(
        registry, candidate, cand, act, settings=gate_settings, active=active, guard_envs=names,
        envs=envs, record=record, console=console, route=route,
    )  # fmt: skip
    return result, cand, act


async def run_gate(
    cfg: Config,
    candidate: str,
    *,
    against: str = "active",
    envs: Sequence[str] | None = None,
    console: Console | None = None,
    route: str | None = None,
) -> GateResult:
    """`selftune gate`: evaluate `candidate` and `against` ("active", "base" or a version) on
    `envs` (default `[improve] envs`) and the guards, as the improve job does, then `gate`.
    With `route`, decide for that route (`evaluate_and_gate`): "active" is what answers the
    route today, `envs` default to the route itself when it names an environment, and a pass
    promotes on the route only."""
    from tuner.registry import open_registry

    registry = open_registry(cfg)
    registry.get(candidate)  # fail before spending time on episodes
    if route is not None:
        check_route(route)
        envs = envs or route_envs(route)
    if against == "active":
        rec = registry.active_for(route)
        reference = rec.version if rec else None
    else:
        reference = None if against == "base" else registry.get(against).version
    if reference == candidate:
        on = f" on route {route}" if route else ""
        raise GateError(f"{candidate} is the reference itself{on}: gate it against another version")
    settings = cfg.improve
    result, _, _ = await evaluate_and_gate(
        cfg, registry, candidate, reference, envs or settings.envs, settings,
        record={"command": "selftune gate"}, console=console, route=route,
    )  # fmt: skip
    return result


def route_envs(route: str) -> list[str]:
    """The environments a route's gate plays when none are given: the route itself, when it
    names an environment (per-environment routes); GateError saying to name them otherwise
    (a subagent role, a traffic cluster)."""
    from agent.envs import EnvironmentLoadError, resolve_environment_path

    try:
        resolve_environment_path(route)
    except EnvironmentLoadError:
        raise GateError(
            f"route {route!r} is not an environment: name the environments its requests come "
            f"from with --env (e.g. `selftune gate VERSION --route {route} --env delegate`)"
        ) from None
    return [route]
