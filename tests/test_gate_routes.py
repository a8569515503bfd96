"""The gate decides per route: a candidate gated for a route is compared with what answers that
route today, guarded by the probe and the route's own history (not other routes'), recorded
with its route and promoted on it, never on the global pointer; the improve job's
`--routes per-env` gates each environment's candidate on its own route. A real registry on
tmp_path; the episodes are canned (the end-to-end run is tests/test_improve_routes.py)."""

from __future__ import annotations

import io
import sys

import pytest
from _tuner_fixtures import make
from rich.console import Console

from agent.config import GateConfig, load_config
from agent.envs.run import EpisodeOutcome, SuiteResult
from tuner.gate import GateError, gate, guard_envs_for, promoted_envs, run_gate
from tuner.registry import Registry, RegistryError
from tuner.schemas import GateResult

SETTINGS = GateConfig(test="margin", margin=0.05, guard_margin=0.05, probe_margin=0.10)
QUIET = Console(file=io.StringIO())
PASS = GateResult(promote=True, reasons=["test"], numbers={})


def result(env: str, solved: int, n: int = 20) -> SuiteResult:
    outcomes = [
        EpisodeOutcome(f"t{i}", 0, f"{env}-{i}", "ok", float(i < solved), i < solved, [], 1, 10,
                       0.1, "x")
        for i in range(n)
    ]  # fmt: skip
    return SuiteResult(env=env, n=n, successes=solved, success_rate=solved / n, seed=0,
                       temperature=0.0, outcomes=outcomes)  # fmt: skip


def _gate(reg, version, env, won, *, active=None, route=None, out=QUIET):
    """`version` vs `active` on `env`: `won` of 20 against 10, the probe level."""
    return gate(reg, version, [result(env, won), result("general", 15)],
                [result(env, 10), result("general", 15)], settings=SETTINGS, active=active,
                guard_envs={"general": "probe"}, envs=[env], console=out, route=route)  # fmt: skip


def test_a_route_gate_promotes_on_its_route_and_never_on_the_global_pointer(tmp_path):
    reg = make(tmp_path, 3)
    reg.promote("v1", PASS)
    out = io.StringIO()
    r = _gate(reg, "v2", "calculator", 16, active="v1", route="calculator",
              out=Console(file=out, width=200))  # fmt: skip
    assert r.promote and r.route == "calculator"
    assert reg.routes() == {"calculator": "v2"} and reg.active().version == "v1"
    assert reg.get("v2").status == "candidate"  # statuses speak of the global pointer
    stored = reg.get("v2").eval_results[-1]
    assert stored["route"] == "calculator" and stored["gate"]["route"] == "calculator"
    assert stored["active_version"] == "v1" and stored["envs"] == ["calculator"]
    assert "eval gate on route calculator: v2 vs v1 -> PROMOTE" in out.getvalue()
    # a pass on a route speaks for that route alone: not for the global pointer, nor another
    # route; a person may still promote it with --force
    with pytest.raises(RegistryError, match="not passed the eval gate: run `selftune gate v2`"):
        reg.promote("v2")
    with pytest.raises(RegistryError, match="on route docs-qa.*--route docs-qa"):
        reg.promote("v2", route="docs-qa")
    reg.rollback(route="calculator")
    assert reg.promote("v2", route="calculator") and reg.routes()["calculator"] == "v2"
    # a global pass counts for any route (the job's environments held the route's)
    _gate(reg, "v3", "calculator", 16, active="v1")
    assert reg.active().version == "v3"
    assert reg.promote("v3", route="docs-qa") and reg.routes()["docs-qa"] == "v3"


def test_a_route_rejection_keeps_a_version_that_serves_elsewhere_serving(tmp_path):
    reg = make(tmp_path, 3)
    reg.promote("v1", PASS, route="docs-qa")
    reg.promote("v3", PASS)
    # v1 serves docs-qa; gated for calculator it loses: a note, its status and routes stay
    r = _gate(reg, "v1", "calculator", 5, route="calculator")
    assert not r.promote
    assert reg.routes() == {"docs-qa": "v1"} and reg.get("v1").status == "candidate"
    assert any(
        n.startswith("rejected by the gate on route calculator") for n in reg.get("v1").notes
    )
    # so does the global active gated for a route
    _gate(reg, "v3", "calculator", 5, active="v1", route="calculator")
    assert reg.active().version == "v3" and reg.get("v3").status == "active"
    # a version that serves nowhere is rejected outright
    _gate(reg, "v2", "calculator", 5, route="calculator")
    assert reg.get("v2").status == "rejected" and "calculator" not in reg.routes()
    # the global path is unchanged: the active adapter cannot be rejected globally
    with pytest.raises(RegistryError, match="v3 is active: roll back first"):
        reg.reject("v3")


def test_what_answers_a_route_is_what_the_router_picks(tmp_path, cfg):
    """`Registry.active_for` (the gate's reference) agrees with agent.model.router.choose."""
    from _tuner_fixtures import fake_adapter

    from agent.model.router import choose

    reg = Registry(cfg.workspace.adapters)
    for i in range(3):
        reg.register(fake_adapter(tmp_path / f"a{i}"), base_model="m")

    def router(route):
        adapter = choose(cfg, route=route).adapter
        if adapter != "active":
            return adapter
        rec = reg.active()  # "active": the global pointer, the base model when it has none
        return rec.version if rec else None

    def ours(route):
        rec = reg.active_for(route)
        return rec.version if rec else None

    assert ours("calculator") is None and router("calculator") is None  # the base model
    reg.promote("v1", PASS)
    assert ours("calculator") == router("calculator") == "v1"  # the global fallback
    reg.promote("v2", PASS, route="calculator")
    assert ours("calculator") == router("calculator") == "v2"
    assert ours("docs-qa") == router("docs-qa") == "v1"
    assert ours(None) == "v1"
    reg.rollback(route="calculator")  # the route back to none: the global again
    assert ours("calculator") == router("calculator") == "v1"


def test_a_route_is_guarded_by_the_probe_and_its_own_history_not_other_routes(tmp_path):
    reg = make(tmp_path, 4)
    _gate(reg, "v1", "calculator", 16)  # global, on calculator
    _gate(reg, "v2", "docs-qa", 16, route="docs-qa")
    assert promoted_envs(reg) == {"calculator": ["v1"]}  # the route's pass is not global
    assert promoted_envs(reg, "docs-qa") == {"docs-qa": ["v2"]}
    assert reg.promoted_on("docs-qa") == ["v2"]
    # a global job on docs-qa is guarded on calculator (what the global adapter was gated on)
    assert guard_envs_for(SETTINGS, reg, ["docs-qa"]) == {
        "general": "probe",
        "calculator": "promoted",
    }
    # a docs-qa route candidate is not: the global adapter never answers docs-qa again
    assert guard_envs_for(SETTINGS, reg, ["docs-qa"], route="docs-qa") == {"general": "probe"}
    # a later candidate of the route on other environments keeps the route's earlier ones
    assert guard_envs_for(SETTINGS, reg, ["word-problems"], route="docs-qa") == {
        "general": "probe",
        "docs-qa": "promoted",
    }
    # and rolled back versions of the route still count, as retired ones do globally
    _gate(reg, "v3", "delegate", 16, route="docs-qa")
    reg.rollback(route="docs-qa")
    assert promoted_envs(reg, "docs-qa") == {"docs-qa": ["v2"], "delegate": ["v3"]}
    # a route's new guard blocks like any other: v4 wins docs-qa, loses delegate
    r = gate(reg, "v4", [result("docs-qa", 19), result("delegate", 4)],
             [result("docs-qa", 10), result("delegate", 15)], settings=SETTINGS, active="v2",
             guard_envs={"delegate": "promoted"}, envs=["docs-qa"], console=QUIET,
             route="docs-qa")  # fmt: skip
    assert not r.promote and r.blocked_by == ["promoted: success_rate[delegate]"]
    assert reg.routes()["docs-qa"] == "v2"


@pytest.fixture
def canned(tmp_path, monkeypatch):
    """A workspace registry (v1 global, v2 on calculator, v3 and v4 candidates) and an
    `evaluate_pair` that returns canned episodes: the candidate wins every environment."""
    make(tmp_path, 4)
    reg = Registry(tmp_path / "adapters")
    reg.promote("v1", PASS)
    reg.promote("v2", PASS, route="calculator")
    cfg = load_config(environ={"SELFTUNE_HOME": str(tmp_path)})
    cfg.tuner.gate.test = "margin"
    cfg.tuner.gate.robustness = []
    seen = []

    async def evaluate_pair(cfg, candidate, active, envs, settings, *, guards=(), **kw):
        seen.append((candidate, active, list(envs), list(guards)))
        every = [*envs, *guards]
        return [result(e, 16 if e != "general" else 15) for e in every], [
            result(e, 10 if e != "general" else 15) for e in every
        ]

    # the module, not `tuner.gate` the function that tuner/__init__ exports under its name
    monkeypatch.setattr(sys.modules["tuner.gate"], "evaluate_pair", evaluate_pair)
    return cfg, reg, seen


async def test_the_gate_command_with_a_route_plays_its_env_against_what_answers_it(canned):
    cfg, reg, seen = canned
    r = await run_gate(cfg, "v3", route="calculator", console=QUIET)
    # against v2 (the route's own), on the route's environment, the probe as the guard
    assert seen == [("v3", "v2", ["calculator"], ["general"])]
    assert r.promote and reg.routes() == {"calculator": "v3"} and reg.active().version == "v1"
    assert reg.get("v3").eval_results[-1]["command"] == "selftune gate"
    # a route without an adapter is answered by the global one: that is the reference
    await run_gate(cfg, "v4", route="docs-qa", console=QUIET)
    assert seen[-1] == ("v4", "v1", ["docs-qa"], ["general"])
    with pytest.raises(GateError, match="route 'researcher' is not an environment.*--env"):
        await run_gate(cfg, "v4", route="researcher")
    with pytest.raises(GateError, match="v3 is the reference itself on route calculator"):
        await run_gate(cfg, "v3", route="calculator")
    with pytest.raises(RegistryError, match="not a route name"):
        await run_gate(cfg, "v4", route="no/slashes")


async def test_per_env_improve_gates_each_environments_candidate_on_its_route(canned):
    from tuner.improve import CycleState, ImproveError, ImproveJob

    cfg, reg, seen = canned
    settings = cfg.improve.updated(envs=["calculator", "docs-qa"], routes="per-env")
    job = ImproveJob(cfg, settings, QUIET)
    job.open(resume=False)
    job._agent = object()  # no model: the evaluations are canned
    assert job.routes() == {"calculator": ["calculator"], "docs-qa": ["docs-qa"]}
    calc = CycleState(index=1, route="calculator", candidate="v3")
    docs = CycleState(index=1, route="docs-qa", candidate="v4")
    await job._gate(calc)
    await job._gate(docs)
    assert seen == [("v3", "v2", ["calculator"], ["general"]),
                    ("v4", "v1", ["docs-qa"], ["general"])]  # fmt: skip
    assert calc.gate["route"] == "calculator" and docs.gate["route"] == "docs-qa"
    assert reg.routes() == {"calculator": "v3", "docs-qa": "v4"} and reg.active().version == "v1"
    assert set(calc.evals["v3"]) == {"calculator"} and set(docs.evals["v4"]) == {"docs-qa"}
    # the next cycle of a route starts from (and is judged against) the route's new adapter
    assert job._active("calculator") == "v3" and job._active(None) == "v1"
    assert job._replay_envs(calc) == ["general"]  # [improve] replay, less the route's own
    # the default is one chain, every environment, gated and promoted globally
    glob = ImproveJob(cfg, cfg.improve.updated(envs=["calculator", "docs-qa"]), QUIET)
    assert glob.routes() == {None: ["calculator", "docs-qa"]}
    # traffic has no environment to split by
    traffic = ImproveJob(cfg, settings.updated(source="traffic"), QUIET)
    traffic.open(resume=False)
    with pytest.raises(ImproveError, match="--routes per-env .* traffic"):
        await traffic.run()


def test_improve_refuses_a_routes_mode_it_does_not_know(tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from agent.cli.tune import improve

    monkeypatch.setenv("SELFTUNE_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    app = typer.Typer()
    app.command()(improve)
    app.command()(lambda: None)
    res = CliRunner().invoke(app, ["improve", "calculator", "--routes", "per-task"], obj={})
    assert res.exit_code == 1 and "--routes 'per-task'" in res.output
