"""Shared helpers for the traces, grader and flag tests: traces built from parts, tasks, and a
child Python that imports this repository."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from traces.schemas import LlmData, RetrievalData, Span, Task, ToolCall, ToolData, Trace, now

ROOT = Path(__file__).resolve().parents[1]


Call = tuple[str, dict, str | None]  # (tool name, arguments, result); None: the tool failed
ADD: Call = ("calculator", {"e": "2+3"}, "5")


def make_trace(
    answer: str | None = "5",
    calls: Sequence[Call] = (),
    *,
    env: str = "calc",
    task_id: str = "t1",
    finish_reason: str | None = None,
    subagents: Sequence[str] = (),
    **fields: Any,
) -> Trace:
    """A finished episode under one "orchestrator" agent span: an llm turn, a tool span per call
    in `calls` (a subagent span for the names in `subagents`), a retrieval, and `answer`.

    With calls, the llm turn is the one that asked for them (finish "tool_calls"); without, it
    is the one that wrote `answer` (finish "stop"); `finish_reason` overrides either. `fields`
    go to the Trace (start, adapter, tags, metadata, ...).
    """
    t0 = fields.pop("start", now())
    t = Trace(
        env=env, task_id=task_id, model="smollm2", start=t0, end=t0 + 1.0, status="ok", **fields
    )
    agent = Span(
        trace_id=t.id, kind="agent", name="orchestrator", start=t0, end=t0 + 1, status="ok"
    )
    asked = [
        ToolCall(id=f"c{i}", name=name, arguments=args, raw_arguments=json.dumps(args))
        for i, (name, args, _) in enumerate(calls, 1)
    ]
    blocks = [json.dumps({"name": c.name, "arguments": c.arguments}) for c in asked]
    completion = "".join(f"<tool_call>{b}</tool_call>" for b in blocks) if asked else answer or ""
    llm = Span(
        trace_id=t.id, parent_id=agent.id, kind="llm", name="chat", start=t0 + 0.1, end=t0 + 0.4,
        status="ok",
        llm=LlmData(
            messages=[{"role": "user", "content": "what is 2+3?"}],
            tools=[{"type": "function", "function": {"name": "calculator"}}],
            completion=completion,
            tool_calls=asked,
            model="smollm2", input_tokens=40, output_tokens=12, prompt_token_ids=[1, 2, 3],
            sampling={"temperature": 0.0},
            finish_reason=finish_reason or ("tool_calls" if asked else "stop"),
        ),
    )  # fmt: skip
    spans = [agent, llm]
    for i, (name, args, result) in enumerate(calls):
        spans.append(
            Span(
                trace_id=t.id,
                parent_id=agent.id,
                kind="subagent" if name in subagents else "tool",
                name=name,
                start=t0 + 0.5 + i * 0.1,
                end=t0 + 0.55 + i * 0.1,
                status="ok",
                tool=ToolData(
                    name=name,
                    call_id=f"c{i + 1}",
                    arguments=args,
                    result=result,
                    error="tool failed" if result is None else None,
                    server="calc_mcp" if name == "calculator" else None,
                ),
            )  # fmt: skip
        )
    spans.append(
        Span(
            trace_id=t.id,
            parent_id=agent.id,
            kind="retrieval",
            name="search",
            start=t0 + 0.8,
            end=t0 + 0.9,
            status="ok",
            retrieval=RetrievalData(
                query="adding", collection="docs", ids=["d1"], scores=[0.9], texts=["addition adds"]
            ),
        )  # fmt: skip
    )
    t.spans = spans
    t.answer = answer
    return t


def served_trace(store: Any, question: str, answer: str, session: str, **meta: Any) -> str:
    """A trace shaped as `selftune serve` records one chat completion (tag `traffic`, one llm
    span), saved in `store`; its id."""
    t0 = now()
    t = Trace(
        model="smollm2", start=t0, end=t0 + 1, status="ok", answer=answer, tags=["traffic"],
        metadata={"source": "serve", "session_id": session, **meta},
    )  # fmt: skip
    span = Span(
        trace_id=t.id, kind="llm", name="chat smollm2", start=t0, end=t0 + 1, status="ok",
        llm=LlmData(messages=[{"role": "user", "content": question}], completion=answer,
                    model="smollm2", finish_reason="stop"),
    )  # fmt: skip
    t.spans = [span]
    store.save(t)
    return t.id


def task(prompt: str = "What is 1234 * 5678?", answer: Any = 7006652, **kw) -> Task:
    return Task(id=kw.pop("id", "t"), prompt=prompt, answer=answer, **kw)


def subprocess_env() -> dict[str, str]:
    """The environment for a child Python that imports this repository's packages."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


PYTHON = sys.executable
