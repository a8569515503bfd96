"""Shared helpers for the traces tests: build realistic traces and stores in tmp_path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from traces.schemas import LlmData, RetrievalData, Span, ToolCall, ToolData, Trace, now

ROOT = Path(__file__).resolve().parents[1]


def make_trace(env: str = "calc", task_id: str = "t1", n_tools: int = 2, **kw) -> Trace:
    """A finished episode: an agent span with an llm call, `n_tools` tool calls, a retrieval."""
    t0 = kw.pop("start", now())
    t = Trace(env=env, task_id=task_id, model="smollm2", start=t0, end=t0 + 1.0, status="ok", **kw)
    agent = Span(
        trace_id=t.id, kind="agent", name="orchestrator", start=t0, end=t0 + 1, status="ok"
    )
    llm = Span(
        trace_id=t.id, parent_id=agent.id, kind="llm", name="chat", start=t0 + 0.1, end=t0 + 0.4,
        status="ok",
        llm=LlmData(
            messages=[{"role": "user", "content": "what is 2+3?"}],
            tools=[{"type": "function", "function": {"name": "calculator"}}],
            completion='<tool_call>{"name": "calculator", "arguments": {"e": "2+3"}}</tool_call>',
            tool_calls=[ToolCall(id="c1", name="calculator", arguments={"e": "2+3"},
                                 raw_arguments='{"e": "2+3"}')],
            model="smollm2", input_tokens=40, output_tokens=12, prompt_token_ids=[1, 2, 3],
            sampling={"temperature": 0.0}, finish_reason="tool_calls",
        ),
    )  # fmt: skip
    spans = [agent, llm]
    for i in range(n_tools):
        spans.append(
            Span(
                trace_id=t.id,
                parent_id=agent.id,
                kind="tool",
                name="calculator",
                start=t0 + 0.5 + i * 0.1,
                end=t0 + 0.55 + i * 0.1,
                status="ok",
                tool=ToolData(
                    name="calculator",
                    call_id=f"c{i}",
                    arguments={"e": "2+3"},
                    result="5",
                    server="calc_mcp",
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
    t.answer = "5"
    return t


def subprocess_env() -> dict[str, str]:
    """The environment for a child Python that imports this repository's packages."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


PYTHON = sys.executable
