"""The Tracer: span trees under concurrent asyncio episodes, errors, decorators, no-op mode."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from traces.schemas import LlmData, ToolData
from traces.store import TraceStore
from traces.tracer import Tracer, current_span_id, current_trace_id


@pytest.fixture
def rec(tmp_path: Path):
    store = TraceStore(tmp_path / "traces.db")
    tracer = Tracer(store)
    yield store, tracer
    tracer.close()
    store.close()


def test_concurrent_async_episodes_get_their_own_span_trees(rec):
    store, tracer = rec

    @tracer.traced(kind="tool")
    async def add(a: int, b: int) -> int:
        await asyncio.sleep(0.005)
        return a + b

    async def episode(i: int) -> str:
        async with tracer.trace(env="calc", task_id=f"t{i}", model="smollm2", adapter="v2") as t:
            async with tracer.span("agent", "orchestrator") as agent:
                with tracer.span(
                    "llm", "chat", llm=LlmData(messages=[{"role": "user", "content": str(i)}])
                ) as s:
                    await asyncio.sleep(0.01)
                    s.llm.completion = f"add {i}"
                # tool calls run as concurrent tasks; each must see `agent` as its parent
                results = await asyncio.gather(add(i, 1), add(i, 2))
                assert current_span_id() == agent.id
            t.finish(status="ok", answer=str(sum(results)))
            return t.id

    async def main():
        return await asyncio.gather(*(episode(i) for i in range(8)))

    ids = asyncio.run(main())
    assert current_trace_id() is None
    for i, tid in enumerate(ids):
        t = store.get(tid)  # trace exit waited for the commit: no flush needed
        assert (t.status, t.answer, t.task_id, t.adapter) == ("ok", str(2 * i + 3), f"t{i}", "v2")
        by_kind = {}
        for s in t.spans:
            by_kind.setdefault(s.kind, []).append(s)
        agent = by_kind["agent"][0]
        assert agent.parent_id is None
        assert by_kind["llm"][0].parent_id == agent.id
        assert by_kind["llm"][0].llm.completion == f"add {i}"
        tools = by_kind["tool"]
        assert sorted(s.tool.result for s in tools) == sorted([str(i + 1), str(i + 2)])
        assert all(s.parent_id == agent.id and s.trace_id == tid for s in tools)
        assert all(s.end >= s.start and s.status == "ok" for s in t.spans)


def test_exceptions_mark_span_and_trace(rec):
    store, tracer = rec
    with pytest.raises(ZeroDivisionError):
        with tracer.trace(env="calc") as t:
            with tracer.span("tool", "div", tool=ToolData(name="div", arguments={"a": 1})):
                1 / 0  # noqa: B018
    got = store.get(t.id)
    assert got.status == "error" and "ZeroDivisionError" in got.error
    span = got.spans[0]
    assert span.status == "error" and span.error.startswith("ZeroDivisionError")
    assert span.tool.error == span.error

    async def timed_out():
        async with tracer.trace(env="calc") as t:
            t.status = "timeout"
            raise TimeoutError
        return t

    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(timed_out())
    (latest,) = store.query(limit=1)
    assert latest.status == "timeout"  # the status set before the exception is kept


def test_traced_sync_function_records_args_result_and_error(rec):
    store, tracer = rec

    @tracer.traced(kind="tool", name="lookup")
    def lookup(key: str, default: int = 0) -> dict:
        if key == "bad":
            raise KeyError(key)
        return {"key": key, "n": default}

    @tracer.traced(kind="retrieval")
    def search(q: str) -> list[str]:
        return [q.upper()]

    assert lookup("x") == {"key": "x", "n": 0}  # outside a trace: works, records nothing
    with tracer.trace(env="kv") as t:
        lookup("a", default=3)
        search("hi")
        with pytest.raises(KeyError):
            lookup("bad")
    spans = store.get(t.id).spans
    ok, ret, bad = spans
    assert ok.tool.name == "lookup" and ok.tool.arguments == {"key": "a", "default": 3}
    assert ok.tool.result == '{"key": "a", "n": 3}'
    assert ret.kind == "retrieval" and ret.attributes == {
        "arguments": {"q": "hi"},
        "result": ["HI"],
    }
    assert bad.status == "error" and "KeyError" in bad.tool.error
    assert store.count(limit=None) == 1


def test_threads_each_record_their_own_trace(rec):
    store, tracer = rec
    ids: list[str] = []

    def work(i: int) -> None:
        with tracer.trace(env="threads", task_id=str(i)) as t:
            for j in range(5):
                with tracer.span("tool", f"step{j}"):
                    pass
        ids.append(t.id)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(ids) == 6
    for tid in ids:
        t = store.get(tid)
        assert [s.name for s in t.spans] == [f"step{j}" for j in range(5)]
        assert all(s.parent_id is None for s in t.spans)


def test_running_row_is_written_at_start(rec):
    store, tracer = rec
    with tracer.trace(env="calc") as t:
        tracer.flush()
        assert store.get(t.id).status == "running"
    assert store.get(t.id).status == "ok"


def test_disabled_tracer_records_nothing(tmp_path: Path):
    tracer = Tracer.disabled()
    with tracer.trace(env="calc") as t:
        with tracer.span("llm", "chat", llm=LlmData(messages=[])) as s:
            s.llm.completion = "x"
        assert current_trace_id() == t.id
    tracer.flush()
    assert t.status == "ok" and tracer._writer is None
    assert list(tmp_path.iterdir()) == []
