"""Routed adapters: one active adapter per route in the registry, kill -9 safe like the global
pointer, and the CLI that promotes, rolls back and lists them."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _tuner_fixtures import fake_adapter, make

from agent.model.adapters import route_versions
from tuner.registry import Registry, RegistryError
from tuner.schemas import GateResult

ROOT = Path(__file__).resolve().parent.parent
PASS = GateResult(promote=True, reasons=["test"], numbers={})


def test_each_route_has_its_own_active_and_history_beside_the_global(tmp_path):
    reg = make(tmp_path, 3)
    reg.promote("v1", PASS)
    reg.promote("v2", PASS, route="calculator")
    reg.promote("v3", PASS, route="docs-qa")
    reg.promote("v3", PASS, route="calculator")
    assert reg.routes() == {"calculator": "v3", "docs-qa": "v3"}
    assert route_versions(reg.root) == reg.routes()  # what the agent's side reads
    assert reg.route_active("calculator").version == "v3"
    assert reg.route_active("researcher") is None  # no route: the global answers
    # the global pointer and the statuses speak of the global active only
    assert reg.active().version == "v1"
    assert [r.status for r in reg.list()] == ["active", "candidate", "candidate"]
    # lineage: the record names the routes it was promoted on
    assert any("promoted on route calculator" in n for n in reg.get("v3").notes)
    assert reg.rollback(route="calculator").version == "v2"
    assert reg.rollback(route="calculator") is None  # back to none: falls back to the global
    assert reg.routes() == {"calculator": None, "docs-qa": "v3"}
    assert reg.active().version == "v1"  # untouched by route rollbacks
    events = json.loads((reg.root / "active").read_text())["events"]
    assert [e.get("route") for e in events] == [
        None,
        "calculator",
        "docs-qa",
        "calculator",
        "calculator",
        "calculator",
    ]


def test_route_promotion_is_gated_and_checked_like_the_global(tmp_path):
    reg = make(tmp_path, 2)
    with pytest.raises(RegistryError, match="not passed the eval gate"):
        reg.promote("v1", route="calculator")
    with pytest.raises(RegistryError, match="not a route name"):
        reg.promote("v1", PASS, route="no spaces/please")
    with pytest.raises(RegistryError, match="no route 'ghost'.*--route ghost"):
        reg.rollback(route="ghost")
    reg.promote("v1", force=True, route="calculator")
    assert any("route calculator with --force" in n for n in reg.get("v1").notes)
    with pytest.raises(RegistryError, match="active on route calculator.*rollback --route"):
        reg.reject("v1")
    (reg.root / "v2" / "adapter_model.safetensors").write_bytes(b"truncated")
    with pytest.raises(RegistryError, match="damaged|not a complete"):
        reg.promote("v2", force=True, route="docs-qa")
    assert reg.routes() == {"calculator": "v1"}


_ROUTE_FLIPPER = """
import sys
from tuner.registry import Registry
from tuner.schemas import GateResult
reg = Registry(sys.argv[1])
ok = GateResult(promote=True, reasons=[], numbers={})
print("ready", flush=True)
i = 0
while True:
    reg.promote(["v1", "v2", "v3"][i % 3], ok, route=["calculator", "docs-qa"][i % 2])
    if i % 5 == 4:
        reg.rollback(route="calculator")
    if i % 7 == 6:
        reg.promote(["v1", "v2"][i % 2], ok)
    i += 1
"""


def test_kill_9_during_route_promotions_leaves_a_valid_pointer(tmp_path):
    make(tmp_path, 3)
    root = tmp_path / "adapters"
    script = tmp_path / "flip.py"
    script.write_text(_ROUTE_FLIPPER)
    rng = random.Random(11)
    seen = set()
    for _ in range(8):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(root)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.01, 0.25))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        reg = Registry(root)  # opening must succeed whatever moment the kill hit
        routes = reg.routes()
        for route, version in routes.items():
            assert version in (None, "v1", "v2", "v3")
            rec = reg.route_active(route)
            if rec is not None:
                assert (Path(rec.path) / "adapter_model.safetensors").is_file()
        statuses = [r.status for r in reg.list()]
        assert statuses.count("active") == (0 if reg.active() is None else 1)
        assert not list(root.glob(".*.tmp-*")) and not list(root.glob("v*/.*.tmp-*"))
        seen.add(tuple(sorted(routes.items(), key=str)))
    assert len(seen) >= 2  # the kills really landed at different states


def test_adapters_cli_promotes_rolls_back_and_lists_routes(tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from agent.cli.tune import adapters_app

    make(tmp_path, 2)
    monkeypatch.setenv("SELFTUNE_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    app = typer.Typer()
    app.add_typer(adapters_app, name="adapters")
    run = CliRunner().invoke

    res = run(app, ["adapters", "promote", "v2", "--route", "docs-qa"], obj={})
    assert res.exit_code == 1 and "not passed the eval gate" in res.output
    res = run(app, ["adapters", "promote", "v2", "--route", "docs-qa", "--force"], obj={})
    assert res.exit_code == 0 and "route docs-qa: v2" in res.output
    listing = run(app, ["adapters", "list"], obj={}).output
    assert "routes: docs-qa -> v2" in listing and "base model" in listing
    res = run(app, ["adapters", "rollback", "--route", "docs-qa"], obj={})
    assert res.exit_code == 0 and "global active answers" in res.output
    res = run(app, ["adapters", "rollback", "--route", "nope"], obj={})
    assert res.exit_code == 1 and "no route 'nope'" in res.output


# -- the router: which route a request takes ------------------------------------------------


class _Guess:
    """A classifier that always guesses `label` with `confidence` (a unit test of `choose`;
    the real MiniLM classifier is tested below on real traces)."""

    def __init__(self, label: str, confidence: float):
        self.label, self.confidence = label, confidence

    def predict(self, texts):
        return [(self.label, self.confidence) for _ in texts]


def test_routing_precedence_explicit_then_env_then_classifier_then_global(tmp_path, cfg):
    from agent.model.router import choose

    reg = Registry(cfg.workspace.adapters)
    for i in range(3):
        reg.register(fake_adapter(tmp_path / f"a{i}"), base_model="m")
    reg.promote("v1", PASS, route="calculator")
    reg.promote("v2", PASS, route="docs-qa")
    reg.promote("v3", PASS, route="researcher")
    sure, unsure = _Guess("docs-qa", 0.9), _Guess("docs-qa", 0.4)

    def pick(**kw):
        d = choose(cfg, **kw)
        return d.route, d.adapter, d.by

    # an explicit route beats the environment, which beats the classifier
    assert pick(route="docs-qa", env="calculator", text="x", classifier=sure) == (
        "docs-qa",
        "v2",
        "route",
    )
    assert pick(env="calculator", text="x", classifier=sure) == ("calculator", "v1", "env")
    assert pick(role="researcher") == ("researcher", "v3", "role")
    assert pick(text="x", classifier=sure) == ("docs-qa", "v2", "classifier")
    # a labelled request whose label has no adapter goes to the global, not to a guess
    assert pick(env="word-problems", text="x", classifier=sure) == (None, "active", "fallback")
    # unsure, no classifier, or a guess whose route has no adapter: the global active
    low = choose(cfg, text="x", classifier=unsure)
    assert (low.route, low.adapter, low.by) == (None, "active", "fallback")
    assert (low.predicted, low.confidence) == ("docs-qa", 0.4)  # recorded all the same
    assert pick(text="x") == (None, "active", "fallback")
    assert pick(text="x", classifier=_Guess("delegate", 0.99)) == (None, "active", "fallback")
    # the threshold is [model] router_threshold
    strict = cfg.model_copy(
        update={"model": cfg.model.model_copy(update={"router_threshold": 0.95})}
    )
    assert choose(strict, text="x", classifier=sure).by == "fallback"
    # a route rolled back to nothing falls back too
    reg.rollback(route="calculator")
    assert pick(env="calculator") == (None, "active", "fallback")


def test_routed_outside_an_episode_means_the_global_active(tmp_path, cfg):
    from agent.model.adapters import resolve_adapter

    reg = Registry(cfg.workspace.adapters)
    assert resolve_adapter(cfg, None, "routed") is None  # nothing promoted: the base
    reg.register(fake_adapter(tmp_path / "a"), base_model="m")
    reg.promote("v1", PASS)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"backend": "openai"})})
    assert resolve_adapter(cfg, None, "routed") == "v1"


def test_a_corrupt_router_file_names_the_fix(cfg):
    from agent.model.router import RouterError, load

    assert load(cfg.workspace.router) is None
    cfg.workspace.router.parent.mkdir(parents=True, exist_ok=True)
    cfg.workspace.router.write_text('{"labels": ["a"]}')
    with pytest.raises(RouterError, match="router.json is corrupt.*selftune router fit"):
        load(cfg.workspace.router)


def test_router_fitted_on_real_traces_routes_held_out_prompts_of_three_envs(cfg, monkeypatch):
    from _route_fixtures import ROUTE_ENVS, env_prompts, record_env_traces

    from agent.model.router import fit_router, load

    assert record_env_traces(cfg, per_env=40) == 120
    clf = fit_router(cfg, heldout_share=0.25)
    h = clf.heldout
    print(f"held-out accuracy {h['accuracy']:.3f} ci95 {h['ci95']} n={h['n']} {h['per_route']}")
    assert sorted(clf.labels) == sorted(ROUTE_ENVS)
    assert sum(clf.counts.values()) == 120 and h["n"] >= 15
    assert h["accuracy"] >= 0.75 and h["ci95"][0] > h["chance"]  # chance is 1/3
    # the environments' test splits were never traced: routed by the saved classifier
    saved = load(cfg.workspace.router)
    right = n = 0
    for env in ROUTE_ENVS:
        got = saved.predict(env_prompts(env, "test", 15))
        right += sum(label == env for label, _ in got)
        n += len(got)
    print(f"test-split accuracy {right / n:.3f} (n={n}, chance 0.333)")
    assert right / n >= 0.75


def test_router_fit_cli_prints_accuracy_and_refuses_one_route(cfg, monkeypatch):
    from _route_fixtures import record_env_traces
    from typer.testing import CliRunner

    from agent.cli import app

    monkeypatch.setenv("SELFTUNE_HOME", str(cfg.workspace.root))
    monkeypatch.chdir(cfg.workspace.root)
    record_env_traces(cfg, per_env=12, envs=("calculator", "docs-qa"))
    run = CliRunner().invoke
    res = run(app, ["router", "fit", "--routes", "calculator"])
    assert res.exit_code == 1 and "at least two routes" in res.output
    res = run(app, ["router", "fit", "--heldout", "0.3"])
    assert res.exit_code == 0, res.output
    assert "held-out accuracy" in res.output and "calculator" in res.output
    assert json.loads(cfg.workspace.router.read_text())["counts"] == {
        "calculator": 12,
        "docs-qa": 12,
    }
    res = run(app, ["router", "which", "What is 12 * 7?", "--env", "docs-qa"])
    assert res.exit_code == 0 and '"route_by": "fallback"' in res.output  # no adapter on it


async def test_a_routed_episode_and_its_subagent_role_each_get_their_routes_adapter(
    tmp_path, cfg, scripted
):
    """The real orchestrator and tracer with a scripted model (the adapters are fake files:
    the openai backend serves them by name, so nothing loads them here)."""
    from _agent_fixtures import call
    from langchain_core.messages import AIMessage

    from agent.agent import Agent
    from agent.config import SubagentConfig

    reg = Registry(cfg.workspace.adapters)
    for i in range(3):
        reg.register(fake_adapter(tmp_path / f"a{i}"), base_model="m")
    reg.promote("v1", PASS, route="delegate")
    reg.promote("v2", PASS, route="researcher")
    reg.promote("v3", PASS)  # the global fallback
    cfg = cfg.model_copy(
        update={"model": cfg.model.model_copy(update={"backend": "openai", "adapter": "routed"})}
    )
    researcher = SubagentConfig(name="researcher", description="Looks up.", tools=[])
    helper = SubagentConfig(name="helper", description="Helps.", tools=[])
    scripted(
        call("researcher", task="find the office size"),
        AIMessage("26"),  # the researcher answers
        call("helper", task="check it"),
        AIMessage("ok"),  # the helper (no route of its own) answers
        AIMessage("26 spaces."),
    )
    async with Agent(cfg) as agent:
        res = await agent.run(
            "How many spaces?",
            env="delegate",
            tools=["researcher", "helper"],
            subagents=[researcher, helper],
        )
        trace = agent.tracer.store.get(res.trace_id)
    assert res.status == "ok" and res.adapter == "v1" and res.route == "delegate"
    assert trace.adapter == "v1" and trace.metadata["route_by"] == "env"
    subs = {s.attributes["subagent"]: s for s in trace.spans if s.attributes.get("subagent")}
    assert subs["researcher"].attributes["adapter"] == "v2"
    assert subs["researcher"].attributes["route_by"] == "role"
    assert subs["helper"].attributes["adapter"] == "v3"  # no route: the global active
    assert subs["helper"].attributes["route_by"] == "fallback"
    by_agent = {}
    for s in trace.spans:
        if s.kind == "llm":
            parent = s.parent_id
            by_agent.setdefault(parent, set()).add(s.llm.adapter)
    assert by_agent[subs["researcher"].id] == {"v2"} and by_agent[subs["helper"].id] == {"v3"}


async def test_a_subagent_answers_with_the_adapter_its_episode_was_given(tmp_path, cfg, scripted):
    """An episode run with an explicit adapter (the gate's candidate, say) hands it to its
    subagents: the researcher of a candidate trained on researcher rows is that candidate,
    not the registry's active adapter (which answered before, so delegate scored 0 after a
    cycle whose orchestrator had learned its part). A subagent's own `adapter` still wins."""
    from _agent_fixtures import call
    from langchain_core.messages import AIMessage

    from agent.agent import Agent
    from agent.config import SubagentConfig

    reg = Registry(cfg.workspace.adapters)
    for i in range(3):
        reg.register(fake_adapter(tmp_path / f"a{i}"), base_model="m")
    reg.promote("v1", PASS)  # the active adapter
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"backend": "openai"})})
    researcher = SubagentConfig(name="researcher", description="Looks up.", tools=[])
    pinned = SubagentConfig(name="pinned", description="Own adapter.", tools=[], adapter="v3")
    scripted(
        call("researcher", task="find the office size"),
        AIMessage("26"),
        call("pinned", task="check it"),
        AIMessage("ok"),
        AIMessage("26 spaces."),
    )
    async with Agent(cfg) as agent:
        res = await agent.run(
            "How many spaces?", tools=["researcher", "pinned"],
            subagents=[researcher, pinned], adapter="v2", max_tokens=48,
        )  # fmt: skip
        trace = agent.tracer.store.get(res.trace_id)
    assert res.status == "ok" and trace.adapter == "v2"
    subs = {s.attributes["subagent"]: s for s in trace.spans if s.attributes.get("subagent")}
    assert subs["researcher"].attributes["adapter"] == "v2"
    assert subs["pinned"].attributes["adapter"] == "v3"
    llm_adapters = {}
    for s in trace.spans:
        if s.kind == "llm":
            llm_adapters.setdefault(s.parent_id, set()).add(s.llm.adapter)
    assert llm_adapters[subs["researcher"].id] == {"v2"}
    assert llm_adapters[subs["pinned"].id] == {"v3"}
