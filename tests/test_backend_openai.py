"""The OpenAI-compatible backend against a real HTTP server on 127.0.0.1 (selftune's own server
over the real SmolLM2 engine): tool calls, token ids, adapters by model name, LoRA routes."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from _runtime_fixtures import make_random_adapter, require_model
from _tuner_fixtures import CALCULATOR
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

from agent.config import load_config
from agent.model import LocalEngine, make_chat_model
from agent.model.openai import ChatOpenAICompatible
from agent.serving.openai_server import build_app

META_KEYS = {
    "model_name",
    "adapter",
    "finish_reason",
    "raw_completion",
    "prompt_token_ids",
    "completion_token_ids",
    "sampling",
}
# one worked example as a prior turn: SmolLM2 copies the latest assistant turn, so it calls
SHOT = [
    HumanMessage("What is 3 * 4?"),
    AIMessage("", tool_calls=[{"name": "calculator", "args": {"expression": "3 * 4"}, "id": "a"}]),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def engine():
    # float32: the one-shot tool call asserted below is a near-tie in bf16 that flipped to a
    # plain answer when the worker computed on one thread instead of two
    eng = LocalEngine(require_model(), dtype="float32", batch_wait_ms=20)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def server(engine):
    port = _free_port()
    srv = uvicorn.Server(
        uvicorn.Config(build_app(engine), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)
    else:
        pytest.fail("the test server did not start")
    yield url
    srv.should_exit = True
    thread.join(timeout=10)


def _cfg(tmp_path, url):
    return load_config(
        environ={"SELFTUNE_HOME": str(tmp_path)},
        overrides={"model": {"backend": "openai", "base_url": f"{url}/v1"}},
    )


def test_tool_call_and_token_ids_through_make_chat_model(server, engine, tmp_path):
    model = make_chat_model(_cfg(tmp_path, server), max_tokens=40)
    assert isinstance(model, ChatOpenAICompatible)
    msg = model.bind_tools([CALCULATOR]).invoke([*SHOT, HumanMessage("What is 48 + 97?")])
    assert msg.tool_calls, msg
    assert msg.tool_calls[0]["name"] == "calculator"
    assert "48" in msg.tool_calls[0]["args"]["expression"]
    meta = msg.response_metadata
    assert set(meta) == META_KEYS
    assert meta["adapter"] is None and meta["model_name"] == "smollm2-135m-instruct"
    assert meta["finish_reason"] == "tool_calls"
    tok = engine.tokenizer
    # the token ids are the real ones: they decode to the completion text
    assert (
        tok.decode(meta["completion_token_ids"], skip_special_tokens=True) == meta["raw_completion"]
    )
    assert "<tool_call>" in meta["raw_completion"]
    prompt = tok.decode(meta["prompt_token_ids"])
    assert prompt.endswith("<|im_start|>assistant\n") and "What is 48 + 97?" in prompt
    assert msg.usage_metadata["input_tokens"] == len(meta["prompt_token_ids"])
    assert meta["sampling"]["max_tokens"] == 40


def test_tool_results_go_back_as_tool_turns(server, engine, tmp_path):
    model = make_chat_model(_cfg(tmp_path, server), max_tokens=12)
    msgs = [
        *SHOT,
        ToolMessage("12", tool_call_id="a", name="calculator"),
    ]
    msg = model.bind_tools([CALCULATOR]).invoke(msgs)
    prompt = engine.tokenizer.decode(msg.response_metadata["prompt_token_ids"])
    assert "<|im_start|>tool\n12<|im_end|>" in prompt
    assert '<tool_call>{"name": "calculator", "arguments": {"expression": "3 * 4"}}' in prompt


def test_server_without_tool_parser_falls_back_to_our_parser(server, tmp_path):
    """A server that leaves `<tool_call>` text in content: the client parses it."""
    model = make_chat_model(_cfg(tmp_path, server))
    raw = {
        "id": "x",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {
                    "role": "assistant",
                    "content": "<tool_call>{'name': 'calculator', 'arguments': {'expression': '1+1'}}",
                },
            }
        ],
    }
    msg = model._create_chat_result(raw).generations[0].message
    assert msg.tool_calls[0]["args"] == {"expression": "1+1"}
    assert msg.content == ""
    assert set(msg.response_metadata) == META_KEYS


def test_lora_routes_and_adapter_by_model_name(server, engine, tmp_path):
    folder = make_random_adapter(tmp_path / "ad", seed=3)
    r = httpx.post(
        f"{server}/v1/load_lora_adapter", json={"lora_name": "calc", "lora_path": str(folder)}
    )
    assert r.status_code == 200, r.text
    ids = [m["id"] for m in httpx.get(f"{server}/v1/models").json()["data"]]
    assert ids == ["smollm2-135m-instruct", "calc"]
    # loading the same name again without load_inplace is refused, as vLLM does
    again = httpx.post(
        f"{server}/v1/load_lora_adapter", json={"lora_name": "calc", "lora_path": str(folder)}
    )
    assert again.status_code == 400 and "already loaded" in again.text

    cfg = _cfg(tmp_path, server)
    question = [HumanMessage("What is the capital of France?")]
    base = make_chat_model(cfg, max_tokens=8).invoke(question)
    tuned = make_chat_model(cfg, adapter="calc", max_tokens=8).invoke(question)
    assert tuned.response_metadata["adapter"] == "calc"
    direct = engine.generate(
        [{"role": "user", "content": "What is the capital of France?"}],
        adapter="calc",
        sampling=__import__("agent.model", fromlist=["Sampling"]).Sampling(max_tokens=8),
    )
    assert tuned.response_metadata["completion_token_ids"] == direct.completion_token_ids
    assert (
        tuned.response_metadata["completion_token_ids"]
        != base.response_metadata["completion_token_ids"]
    )

    r = httpx.post(f"{server}/v1/unload_lora_adapter", json={"lora_name": "calc"})
    assert r.status_code == 200
    assert [m["id"] for m in httpx.get(f"{server}/v1/models").json()["data"]] == [
        "smollm2-135m-instruct"
    ]


def test_bad_requests_get_clear_errors(server):
    r = httpx.post(
        f"{server}/v1/chat/completions",
        json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.status_code == 404
    assert "nope" in r.json()["error"]["message"] and "smollm2" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/v1/unload_lora_adapter", json={"lora_name": "ghost"})
    assert r.status_code == 404 and "ghost" in r.text
    r = httpx.post(
        f"{server}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nonexistent"}
    )
    assert r.status_code == 400 and "adapter_config.json" in r.text


def test_the_server_bounds_bodies_and_generation_and_health_stays_up(server):
    big = {"messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]}
    r = httpx.post(f"{server}/v1/chat/completions", json=big, timeout=60)
    assert r.status_code == 413 and "bytes" in r.json()["error"]["message"]
    r = httpx.post(
        f"{server}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000},
    )
    assert r.status_code == 400 and "cap of 4096" in r.json()["error"]["message"]

    async def long_prompt_and_health() -> float:
        # a prompt of ~3.5 MB takes seconds to tokenise; /health must answer meanwhile
        text = "word " * 700_000
        async with httpx.AsyncClient(timeout=120) as client:
            chat = asyncio.create_task(
                client.post(
                    f"{server}/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": text}], "max_tokens": 1},
                )
            )
            await asyncio.sleep(0.5)  # the request is in: its body is being read or tokenised
            start = time.monotonic()
            health = await client.get(f"{server}/health")
            took = time.monotonic() - start
            assert health.status_code == 200
            answer = await chat
            assert answer.status_code == 400  # longer than the model's context: said so
            return took

    # tokenising that prompt takes ~10 s on 2 busy cores; on the event loop it blocked /health
    assert asyncio.run(long_prompt_and_health()) < 3.0


def test_concurrent_requests_share_a_batch(server, engine, tmp_path):
    model = make_chat_model(_cfg(tmp_path, server), max_tokens=6)
    before = len(engine.batcher.batch_sizes)

    async def run():
        return await asyncio.gather(
            *[model.ainvoke([HumanMessage(f"Say {w}.")]) for w in ("yes", "no", "maybe", "ok")]
        )

    replies = asyncio.run(run())
    assert all(r.response_metadata["completion_token_ids"] for r in replies)
    assert max(engine.batcher.batch_sizes[before:]) >= 2
