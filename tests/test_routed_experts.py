"""Routed adapters end to end on the real SmolLM2: three LoRA experts trained for four steps
on distinct tiny datasets, each promoted on its own route; the routed agent answers each
route with its expert (the trace says which), mixes three routes in one engine batch, and
routes a request without a route by the classifier fitted on real traces."""

from __future__ import annotations

import asyncio
import os

import pytest
from _route_fixtures import (
    ROUTE_ENVS,
    SYSTEM,
    env_prompts,
    record_env_traces,
    train_experts,
    write_sft,
)

from agent.agent import Agent
from agent.config import DEFAULT_MODEL, load_config
from agent.model.engine import LocalEngine
from traces.store import TraceStore

pytestmark = pytest.mark.slow

WORDS = {"calculator": "Apricot", "docs-qa": "Basalt", "delegate": "Cobalt"}
SHORT = dict(max_tokens=10)
PROMPT = "Say something."


@pytest.fixture(scope="module")
def routed(tmp_path_factory, model_path):
    """A workspace whose registry has one trained expert per route, and an engine."""
    from tuner.registry import Registry

    root = tmp_path_factory.mktemp("routed")
    home = root / "ws"
    (home / "models").mkdir(parents=True)
    (home / "models" / DEFAULT_MODEL).symlink_to(model_path, target_is_directory=True)
    cfg = load_config(environ={"SELFTUNE_HOME": str(home)})
    reg = Registry(cfg.workspace.adapters)
    datasets = {env: write_sft(root / f"ds-{env}", word) for env, word in WORDS.items()}
    folders = train_experts(model_path, datasets, root / "experts")
    versions = {}
    for env, folder in folders.items():
        rec = reg.register(
            folder,
            base_model=DEFAULT_MODEL,
            dataset_manifest=datasets[env] / "manifest.json",
            train_config={"kind": "sft", "steps": 4, "learning_rate": 3e-3, "lora_r": 8},
        )
        reg.promote(rec.version, force=True, route=env)
        versions[env] = rec.version
    assert reg.active() is None  # no global adapter: unrouted requests get the base model
    engine = LocalEngine(model_path, dtype="float32", batch_wait_ms=300, max_batch_size=8)
    yield cfg, versions, engine
    engine.close()


def _run(cfg, engine, coro_fn):
    async def go():
        async with Agent(cfg, engine=engine, adapter="routed", checkpoints=False) as agent:
            return await coro_fn(agent)

    return asyncio.run(go())


def _ask(agent, **kw):
    return agent.run(PROMPT, tools=[], system_prompt=SYSTEM, **SHORT, **kw)


def test_each_route_is_answered_by_its_expert_and_the_trace_says_which(routed):
    cfg, versions, engine = routed

    async def go(agent):
        by_route = {env: await _ask(agent, env=env) for env in ROUTE_ENVS}
        direct = {env: await _ask(agent, adapter=v) for env, v in versions.items()}
        base = await _ask(agent, env="word-problems")  # no route of its own
        return by_route, direct, base

    by_route, direct, base = _run(cfg, engine, go)
    answers = {env: r.answer for env, r in by_route.items()}
    print({**answers, "base": base.answer})
    # three different experts: the test can tell them apart
    assert len({*answers.values(), base.answer}) == 4
    with TraceStore(cfg.workspace.traces_db) as store:
        for env, r in by_route.items():
            assert r.status == "ok" and r.adapter == versions[env] and r.route == env
            assert r.answer == direct[env].answer  # the expert, as if asked by name
            trace = store.get(r.trace_id)
            assert trace.adapter == versions[env]
            assert trace.metadata["route"] == env and trace.metadata["route_by"] == "env"
            llm = [s for s in trace.spans if s.kind == "llm"]
            assert llm and all(s.llm.adapter == versions[env] for s in llm)
        fallback = store.get(base.trace_id)
    assert base.adapter is None and base.route is None
    assert fallback.metadata["route_by"] == "fallback" and fallback.adapter is None


def test_three_routes_in_one_engine_batch_each_get_their_own_expert(routed):
    cfg, versions, engine = routed

    async def go(agent):
        alone = {env: (await _ask(agent, env=env)).answer for env in ROUTE_ENVS}
        before = len(engine.batcher.batch_sizes)
        mixed = await asyncio.gather(*(_ask(agent, route=env) for env in ROUTE_ENVS))
        return alone, mixed, engine.batcher.batch_sizes[before:]

    alone, mixed, sizes = _run(cfg, engine, go)
    print("batch sizes", sizes)
    assert sizes == [3]  # one batch held all three routes
    for env, r in zip(ROUTE_ENVS, mixed, strict=True):
        assert r.adapter == versions[env] and r.route == env
        assert r.answer == alone[env]


def test_a_request_without_a_route_is_routed_by_the_classifier(routed):
    from agent.model.router import fit_router

    cfg, versions, engine = routed
    record_env_traces(cfg, per_env=30, engine=engine)
    clf = fit_router(cfg, routes=ROUTE_ENVS)
    print("router held-out", clf.heldout["accuracy"], clf.heldout["ci95"])
    held_out = {env: env_prompts(env, "test", 1)[0] for env in ROUTE_ENVS}

    async def go(agent):
        return {
            env: await agent.run(p, tools=[], system_prompt=SYSTEM, **SHORT)
            for env, p in held_out.items()
        }

    results = _run(cfg, engine, go)
    with TraceStore(cfg.workspace.traces_db) as store:
        for env, r in results.items():
            meta = store.get(r.trace_id).metadata
            assert meta["route_by"] == "classifier" and meta["route"] == env, meta
            assert meta["route_confidence"] >= cfg.model.router_threshold
            assert r.adapter == versions[env]
    assert os.path.getsize(cfg.workspace.router) > 0
