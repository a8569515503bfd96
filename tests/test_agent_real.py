"""The agent with real parts: the SmolLM2 model, our MCP server over stdio, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _agent_fixtures import call
from _tuner_fixtures import WORKED_EXAMPLE
from langchain_core.messages import AIMessage

from agent.agent import Agent
from agent.config import SubagentConfig
from tools.schemas import McpServerConfig

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
async def test_real_model_calculator_episode_traces_llm_tool_llm_with_token_ids(cfg):
    cfg.model.max_new_tokens = 48
    async with Agent(cfg) as agent:
        res = await agent.run(
            "What is 48 * 97?",
            tools=["calculator"],
            demos=WORKED_EXAMPLE,
            env="calc",
            task_id="t48",
        )
        trace = agent.tracer.store.get(res.trace_id)
        tokenizer = agent.engine.tokenizer
    assert res.status == "ok", res.error
    spans = sorted(trace.spans, key=lambda s: s.start)
    kinds = [s.kind for s in spans if s.kind != "agent"]
    # with one worked example the greedy base model calls the tool, then answers
    assert kinds == ["llm", "tool", "llm"], [
        (s.kind, s.name, s.llm.completion if s.llm else None) for s in spans
    ]
    tool = next(s for s in spans if s.kind == "tool")
    assert tool.tool.name == "calculator" and tool.status == "ok" and tool.tool.result == "4656"
    for s in (s for s in spans if s.kind == "llm"):
        assert s.llm.prompt_token_ids and s.llm.completion_token_ids
        assert s.llm.input_tokens == len(s.llm.prompt_token_ids)
        assert s.llm.output_tokens == len(s.llm.completion_token_ids)
        # the recorded ids are what the model produced: they decode to the recorded text
        decoded = tokenizer.decode(s.llm.completion_token_ids, skip_special_tokens=True)
        assert decoded.strip() == s.llm.completion.strip()
    first = next(s for s in spans if s.kind == "llm")
    assert first.llm.tool_calls[0].name == "calculator" and first.llm.tool_calls[0].arguments
    assert trace.metadata["demo_messages"] == 6


def _our_server(cfg) -> McpServerConfig:
    return McpServerConfig(
        name="st",
        command=sys.executable,
        args=["-m", "tools.mcp_server"],
        cwd=str(REPO),
        timeout_s=20,
    )


def _server_pids() -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "tools.mcp_server" in cmd and int(entry) != os.getpid():
                out.append(int(entry))
    return out


async def test_mcp_server_killed_mid_episode_gives_an_error_span_and_the_episode_finishes(
    cfg, scripted
):
    cfg.mcp = [_our_server(cfg)]
    killed: list[int] = []

    def kill_then_call():
        (pid,) = _server_pids()
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        return call("st__calculator", expression="2+2")

    scripted(
        call("st__calculator", expression="6*7"),
        kill_then_call,
        call("st__calculator", expression="3*3"),  # served by the restarted server
        AIMessage("finished"),
    )
    async with Agent(cfg, engine=object()) as agent:
        res = await agent.run("use the server", tools=["st__calculator"])
        trace = agent.tracer.store.get(res.trace_id)
    assert res.status == "ok" and res.answer == "finished" and killed
    tools = [s for s in sorted(trace.spans, key=lambda s: s.start) if s.kind == "tool"]
    assert [s.status for s in tools] == ["ok", "error", "ok"]
    assert tools[0].tool.result == "42" and tools[0].tool.server == "st"
    assert "MCP server 'st'" in tools[1].error
    assert tools[2].tool.result == "9"


async def test_subagent_with_real_model_nests_its_spans(cfg):
    """The researcher subagent really runs on SmolLM2 (whatever it answers), inside the trace.
    The demo ends on a researcher call and decoding is greedy, so the model delegates every
    time; if it ever does not, the test fails rather than skips."""
    cfg.model.max_new_tokens = 24
    researcher = SubagentConfig(
        name="researcher", description="Answers questions.", tools=[], max_steps=1
    )
    demo = [
        {"role": "user", "content": "Ask the researcher what colour the sky is."},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "r1",
                    "type": "function",
                    "function": {
                        "name": "researcher",
                        "arguments": {"task": "What colour is the sky?"},
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "r1", "name": "researcher", "content": "Blue."},
        {"role": "assistant", "content": "The researcher says: blue."},
        # ending on a call, like WORKED_EXAMPLE: the model copies the latest assistant turn
        {"role": "user", "content": "Ask the researcher how many legs a spider has."},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "r2",
                    "type": "function",
                    "function": {
                        "name": "researcher",
                        "arguments": {"task": "How many legs does a spider have?"},
                    },
                }
            ],
        },
    ]
    async with Agent(cfg) as agent:
        res = await agent.run(
            "Ask the researcher what 2 + 2 is.",
            tools=["researcher"],
            subagents=[researcher],
            demos=demo,
            max_steps=2,
        )
        trace = agent.tracer.store.get(res.trace_id)
    sub = [s for s in trace.spans if s.kind == "subagent"]
    assert sub, (
        f"the model did not delegate (greedy, after a demo ending on a call): {res.answer!r}"
    )
    inner = [s for s in trace.spans if s.kind == "agent" and s.parent_id == sub[0].id]
    assert inner and inner[0].attributes["subagent"] == "researcher"
    assert any(s.kind == "llm" and s.parent_id == inner[0].id for s in trace.spans)


@pytest.mark.slow
def test_cli_chat_and_run_work_on_the_embedded_default(cfg, cli_env):
    exe = str(Path(sys.executable).parent / "selftune")
    chat = subprocess.run(
        [exe, "chat", "Say hello.", "--max-tokens", "8"],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip()
    run = subprocess.run(
        [exe, "run", "What is 2 + 2?", "--tools", "", "--json"],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode in (0, 3), run.stderr
    data = json.loads(run.stdout)
    assert data["status"] == "ok" and len(data["trace_id"]) == 32
    listed = subprocess.run(
        [exe, "traces", "show", data["trace_id"][:10]],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0 and "llm" in listed.stdout
