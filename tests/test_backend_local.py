"""The local backend on the real SmolLM2: batching, adapters, sampling, context limits, ChatLocal."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import pytest
from _runtime_fixtures import make_random_adapter, require_model
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool

from agent.config import load_config
from agent.model import ChatLocal, LocalEngine, Sampling, make_chat_model
from agent.model.engine import AdapterError, ContextOverflowError
from agent.model.files import ModelError
from agent.model.hardware import cpu_has_bf16

Q = [{"role": "user", "content": "Tell me a long story about a dragon."}]
GREEDY8 = Sampling(max_tokens=8)


@pytest.fixture(scope="module")
def engine():
    # float32: the tests below compare token ids across batch shapes and expect the one-shot
    # tool call; in bf16 (an avx512_bf16 CPU) rounding depends on the batch's padding and
    # near-ties go either way, so those would hold by luck. The default dtype is tested apart.
    eng = LocalEngine(require_model(), dtype="float32", batch_wait_ms=50, max_batch_size=8)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {n: make_random_adapter(root / n, seed=s) for n, s in (("one", 1), ("two", 2))}


def test_loads_with_the_dtype_the_cpu_supports(engine):
    import torch

    auto = LocalEngine(require_model())
    try:
        assert auto.dtype == (torch.bfloat16 if cpu_has_bf16() else torch.float32)
        assert auto.model.dtype == auto.dtype
        assert auto.generate(Q, sampling=GREEDY8).completion_tokens == 8
    finally:
        auto.close()
    assert engine.dtype == torch.float32  # asked for
    assert engine.name == "smollm2-135m-instruct" and engine.context_length == 8192


def test_missing_or_corrupt_model_folder_says_run_setup(tmp_path):
    with pytest.raises(ModelError, match="selftune setup"):
        LocalEngine(tmp_path / "nope")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / f).write_text("{}")
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelError, match=str(broken)):
        LocalEngine(broken)


def test_result_fields_and_greedy_is_deterministic(engine):
    a = engine.generate(Q, sampling=GREEDY8)
    b = engine.generate(Q, sampling=GREEDY8)
    assert a.completion_token_ids == b.completion_token_ids
    assert a.text == engine.tokenizer.decode(a.completion_token_ids, skip_special_tokens=True)
    assert engine.tokenizer.decode(a.prompt_token_ids).endswith("<|im_start|>assistant\n")
    assert a.finish_reason == "length" and a.completion_tokens == 8
    assert a.adapter is None and a.sampling["max_tokens"] == 8


@pytest.mark.slow
def test_concurrent_requests_share_one_generate_and_match_solo_answers(engine):
    prompts = [[{"role": "user", "content": f"Name a color number {i}."}] for i in range(4)]
    solo = [engine.generate(p, sampling=Sampling(max_tokens=6 + i)) for i, p in enumerate(prompts)]
    before = len(engine.batcher.batch_sizes)

    async def together():
        return await asyncio.gather(
            *[
                engine.agenerate(p, sampling=Sampling(max_tokens=6 + i))
                for i, p in enumerate(prompts)
            ]
        )

    batched = asyncio.run(together())
    assert engine.batcher.batch_sizes[before:] == [4]
    # left padding and per-row max_tokens: each row answers as it would alone
    for s, b, i in zip(solo, batched, range(4), strict=True):
        assert b.completion_token_ids == s.completion_token_ids
        assert b.completion_tokens <= 6 + i


def test_event_loop_stays_free_while_generating(engine):
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    async def main():
        t = asyncio.create_task(ticker())
        await engine.agenerate(Q, sampling=Sampling(max_tokens=16))
        t.cancel()

    asyncio.run(main())
    assert ticks > 5


def test_stop_strings_and_finish_reasons(engine):
    full = engine.generate(Q, sampling=Sampling(max_tokens=12))
    word = full.text.split()[2]
    cut = engine.generate(Q, sampling=Sampling(max_tokens=12, stop=(word,)))
    assert cut.finish_reason == "stop"
    assert word not in cut.text and full.text.startswith(cut.text)
    assert len(cut.completion_token_ids) < len(full.completion_token_ids)
    done = engine.generate(
        [{"role": "user", "content": "Reply with just the word yes."}],
        sampling=Sampling(max_tokens=40),
    )
    assert done.finish_reason == "stop"
    assert done.completion_token_ids[-1] in engine.eos_ids


def test_seeded_sampling_repeats_per_row_even_in_a_batch(engine):
    s = Sampling(temperature=1.0, top_p=0.95, max_tokens=10, seed=7)
    alone = engine.generate(Q, sampling=s)
    futures = [
        engine.submit(Q, sampling=s),
        engine.submit(Q, sampling=Sampling(temperature=1.0, max_tokens=10)),
        engine.submit(Q, sampling=Sampling(temperature=1.0, max_tokens=10, seed=8)),
    ]
    results = [f.result() for f in futures]
    assert results[0].completion_token_ids == alone.completion_token_ids
    assert results[2].completion_token_ids != alone.completion_token_ids


def test_greedy_and_sampled_rows_share_one_generate_call(engine):
    greedy_alone = engine.generate(Q, sampling=GREEDY8)
    before = len(engine.batcher.batch_sizes)
    futures = [
        engine.submit(Q, sampling=GREEDY8),
        engine.submit(Q, sampling=Sampling(temperature=0.8, max_tokens=8, seed=1)),
        engine.submit(Q, sampling=Sampling(temperature=1.2, top_p=0.5, max_tokens=8, seed=2)),
    ]
    results = [f.result() for f in futures]
    assert engine.batcher.batch_sizes[before:] == [3]
    assert results[0].completion_token_ids == greedy_alone.completion_token_ids
    assert results[1].sampling["temperature"] == 0.8


def test_shared_prompt_prefix_is_computed_once_and_changes_nothing(engine):
    system = {"role": "system", "content": "You answer questions about birds. " * 12}
    prompts = [
        [system, {"role": "user", "content": f"Name a bird that lives in {place}."}]
        for place in ("Norway", "Chile", "Kenya")
    ]
    engine.prefix_cache.max_entries = 0  # off: the reference answers
    plain = [
        f.result().completion_token_ids
        for f in [engine.submit(p, sampling=GREEDY8) for p in prompts]
    ]
    engine.prefix_cache.max_entries = 8
    hits = engine.prefix_cache.hits
    for _ in range(2):
        cached = [
            f.result().completion_token_ids
            for f in [engine.submit(p, sampling=GREEDY8) for p in prompts]
        ]
        assert cached == plain
    # the second round found the system prompt's states from the first (at least once)
    assert engine.prefix_cache.hits > hits
    assert engine.prefix_cache.shared_length([_req(engine, p) for p in prompts]) >= 80


def _req(engine, messages):
    from agent.model.engine import _Request

    return _Request(engine.prompt_ids(messages), None, GREEDY8)


@pytest.mark.slow
def test_adapters_load_switch_and_mix_in_one_batch(engine, adapters):
    base = engine.generate(Q, sampling=GREEDY8).completion_token_ids
    engine.load_adapter("one", adapters["one"])
    engine.load_adapter("two", adapters["two"])
    try:
        assert set(engine.adapters()) == {"one", "two"}
        one = engine.generate(Q, adapter="one", sampling=GREEDY8).completion_token_ids
        two = engine.generate(Q, adapter="two", sampling=GREEDY8).completion_token_ids
        assert len({tuple(base), tuple(one), tuple(two)}) == 3
        # a batch of base rows alone runs with the adapters switched off
        assert engine.generate(Q, sampling=GREEDY8).completion_token_ids == base
        before = len(engine.batcher.batch_sizes)
        futs = [engine.submit(Q, adapter=a, sampling=GREEDY8) for a in ("two", None, "one")]
        mixed = [f.result() for f in futs]
        assert engine.batcher.batch_sizes[before:] == [3]
        assert [m.completion_token_ids for m in mixed] == [two, base, one]
        assert [m.adapter for m in mixed] == ["two", None, "one"]
        with pytest.raises(AdapterError, match="already loaded"):
            engine.load_adapter("one", adapters["one"])
        with pytest.raises(AdapterError, match="ghost.*loaded: \\['one', 'two'\\]"):
            engine.generate(Q, adapter="ghost", sampling=GREEDY8)
    finally:
        engine.unload_adapter("one")
        engine.unload_adapter("two")
    assert engine.adapters() == {}
    assert engine.generate(Q, sampling=GREEDY8).completion_token_ids == base


def test_adapter_for_another_base_model_is_refused(engine, tmp_path, adapters):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(adapters["one"], other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "Qwen/Qwen2.5-0.5B-Instruct"
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="Qwen/Qwen2.5-0.5B-Instruct.*smollm2-135m-instruct"):
        engine.load_adapter("other", other)
    with pytest.raises(AdapterError, match="adapter_config.json"):
        engine.load_adapter("empty", tmp_path)
    assert engine.adapters() == {}


def test_context_overflow_is_refused_or_trimmed_with_a_warning(engine, caplog):
    long_turns = [
        {"role": "system", "content": "Be brief."},
        *[
            {"role": r, "content": f"turn {i} " + "word " * 1500}
            for i, r in zip(range(6), ["user", "assistant"] * 3, strict=True)
        ],
        {"role": "user", "content": "Last question: what is 2 + 2?"},
    ]
    with pytest.raises(ContextOverflowError, match='overflow = "trim"'):
        engine.prompt_ids(long_turns, max_tokens=16)
    engine.overflow = "trim"
    try:
        with caplog.at_level(logging.WARNING, logger="agent.model.engine"):
            ids = engine.prompt_ids(long_turns, max_tokens=16)
        text = engine.tokenizer.decode(ids)
        assert len(ids) <= engine.context_length - 16
        assert "Be brief." in text and "Last question" in text and "turn 0 " not in text
        assert "dropped" in caplog.text
        with pytest.raises(ContextOverflowError, match="even with only"):
            engine.prompt_ids([{"role": "user", "content": "word " * 9000}], max_tokens=16)
    finally:
        engine.overflow = "error"


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression."""
    return str(expression)


SHOT = [
    HumanMessage("What is 3 * 4?"),
    AIMessage("", tool_calls=[{"name": "calculator", "args": {"expression": "3 * 4"}, "id": "a"}]),
]


def test_chat_local_returns_tool_calls_usage_and_trace_metadata(engine):
    model = ChatLocal(engine=engine, max_tokens=40).bind_tools([calculator])
    msg = asyncio.run(model.ainvoke([*SHOT, HumanMessage("What is 48 + 97?")]))
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "calculator"
    assert msg.tool_calls[0]["args"]["expression"].replace(" ", "") == "48+97"
    meta = msg.response_metadata
    assert set(meta) == {
        "model_name",
        "adapter",
        "finish_reason",
        "raw_completion",
        "prompt_token_ids",
        "completion_token_ids",
        "sampling",
    }
    assert "<tool_call>" in meta["raw_completion"]
    assert msg.usage_metadata["input_tokens"] == len(meta["prompt_token_ids"])
    assert msg.usage_metadata["output_tokens"] == len(meta["completion_token_ids"])
    prompt = engine.tokenizer.decode(meta["prompt_token_ids"])
    assert '"name": "calculator"' in prompt.split("<|im_end|>")[0]  # tool schema in system turn


def test_chat_local_sends_tool_results_and_reports_bad_calls(engine):
    model = ChatLocal(engine=engine, max_tokens=4)
    msg = model.invoke(
        [SystemMessage("Be brief."), *SHOT, ToolMessage("12", tool_call_id="a", name="calculator")]
    )
    prompt = engine.tokenizer.decode(msg.response_metadata["prompt_token_ids"])
    assert "<|im_start|>tool\n12<|im_end|>" in prompt
    assert '<tool_call>{"name": "calculator", "arguments": {"expression": "3 * 4"}}' in prompt
    # an unparseable call from the model lands in invalid_tool_calls with the error
    from agent.model.chat_local import completion_to_message
    from agent.model.engine import Completion

    bad = completion_to_message(
        Completion("<tool_call>calc(1)</tool_call>", [1], [2], "stop", None, "m", {})
    )
    assert not bad.tool_calls and "could not parse tool call" in bad.invalid_tool_calls[0]["error"]


def test_bind_tools_accepts_langchain_tools_dicts_and_schema_objects(engine):
    class Schema:
        def schema(self):
            return {"name": "lookup", "description": "d", "parameters": {"type": "object"}}

    openai_dict = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    bound = ChatLocal(engine=engine).bind_tools([calculator, openai_dict, Schema()])
    names = [t["function"]["name"] for t in bound.kwargs["tools"]]
    assert names == ["calculator", "f", "lookup"]


def test_make_chat_model_local_uses_config_defaults(engine, tmp_path):
    cfg = load_config(
        environ={"SELFTUNE_HOME": str(tmp_path)}, overrides={"model": {"max_new_tokens": 5}}
    )
    m = make_chat_model(cfg, engine=engine, temperature=0.5, adapter=None)
    assert isinstance(m, ChatLocal) and m.max_tokens == 5 and m.temperature == 0.5
    with pytest.raises(TypeError, match="unknown settings"):
        make_chat_model(cfg, engine=engine, temprature=1)


def test_sync_calls_from_threads_are_batched(engine):
    model = ChatLocal(engine=engine, max_tokens=4)
    before = len(engine.batcher.batch_sizes)
    out = [None] * 3

    def run(i):
        out[i] = model.invoke([HumanMessage(f"Say {i}.")])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(o.response_metadata["completion_token_ids"] for o in out)
    assert max(engine.batcher.batch_sizes[before:]) >= 2


def test_a_cancelled_request_is_dropped_and_its_batch_neighbours_still_answer(engine):
    """An episode that times out cancels its request. Setting a result on that cancelled
    future raised, which failed every later request of the same batch (seen under load: the
    neighbours' episodes errored with InvalidStateError)."""
    prompts = [[{"role": "user", "content": f"Name a fruit number {i}."}] for i in range(3)]
    solo = [engine.generate(p, sampling=GREEDY8) for p in prompts]
    busy = engine.submit(Q, sampling=Sampling(max_tokens=48))  # keeps the batcher busy
    time.sleep(0.3)  # its batch has started: the next three queue up behind it, together
    before = len(engine.batcher.batch_sizes)
    futures = [engine.submit(p, sampling=GREEDY8) for p in prompts]
    assert futures[1].cancel(), "the request was already running: the test proves nothing"
    busy.result(timeout=120)
    first, third = futures[0].result(timeout=120), futures[2].result(timeout=120)
    assert first.completion_token_ids == solo[0].completion_token_ids
    assert third.completion_token_ids == solo[2].completion_token_ids
    assert futures[1].cancelled()
    assert engine.batcher.batch_sizes[before:] == [2]  # the cancelled one was never generated
