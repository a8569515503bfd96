"""The orchestrator: limits, error paths, tracing, subagents and checkpoints.

The graph mechanics are tested with a scripted chat model (what it says is fixed, so each
path is hit on purpose); the real SmolLM2 model runs full episodes in the tests marked slow.
"""

from __future__ import annotations

import asyncio
import json

from _agent_fixtures import bad_call, call
from langchain_core.messages import AIMessage

from agent.agent import Agent
from agent.config import SubagentConfig
from tools.base import Tool


def spans_of(agent: Agent, trace_id: str):
    trace = agent.tracer.store.get(trace_id)
    return trace, [(s.kind, s.name, s.status) for s in sorted(trace.spans, key=lambda s: s.start)]


async def test_tool_episode_is_traced_step_by_step(cfg, scripted):
    scripted(call("calculator", expression="48*97"), AIMessage("48 * 97 = 4656"))
    async with Agent(cfg, engine=object()) as agent:
        res = await agent.run("What is 48*97?", tools=["calculator"], env="unit", task_id="t1")
        trace, spans = spans_of(agent, res.trace_id)
    assert res.status == "ok" and res.answer == "48 * 97 = 4656" and res.steps == 2
    assert trace.status == "ok" and trace.answer == res.answer and trace.env == "unit"
    kinds = [k for k, _, _ in spans]
    assert kinds == ["agent", "llm", "tool", "llm"]
    tool_span = next(s for s in trace.spans if s.kind == "tool")
    assert tool_span.tool.arguments == {"expression": "48*97"} and tool_span.tool.result == "4656"
    root = next(s for s in trace.spans if s.kind == "agent")
    assert all(s.parent_id == root.id for s in trace.spans if s.kind != "agent")
    first_llm = next(s for s in trace.spans if s.kind == "llm")
    assert first_llm.llm.tools[0]["function"]["name"] == "calculator"
    assert first_llm.llm.messages[-1] == {"role": "user", "content": "What is 48*97?"}


async def test_tool_error_and_unparseable_call_go_back_to_the_model(cfg, scripted):
    model = scripted(
        call("calculator", expression="1/0"),
        bad_call('<tool_call>{"name": "calculator"'),
        AIMessage("gave up"),
    )
    async with Agent(cfg, engine=object()) as agent:
        res = await agent.run("divide", tools=["calculator"])
        trace, spans = spans_of(agent, res.trace_id)
    assert res.status == "ok" and res.answer == "gave up"
    errors = [s for s in trace.spans if s.kind == "tool"]
    assert [s.status for s in errors] == ["error", "error"]
    assert "division by zero" in errors[0].error.lower() or "zero" in errors[0].error.lower()
    assert "could not parse" in errors[1].error
    # the model saw both errors as tool messages with error status
    last_prompt = model.seen[-1]
    tool_msgs = [m for m in last_prompt if m.type == "tool"]
    assert len(tool_msgs) == 2 and all(m.status == "error" for m in tool_msgs)
    assert tool_msgs[1].content.startswith("Error: could not parse")


async def test_step_limit_ends_with_max_steps_not_an_exception(cfg, scripted):
    scripted(*[call("calculator", expression="1+1") for _ in range(10)])
    async with Agent(cfg, engine=object()) as agent:
        res = await agent.run("loop forever", tools=["calculator"], max_steps=3)
        trace, _ = spans_of(agent, res.trace_id)
    assert res.status == "max_steps" and res.steps == 3 and res.answer is None
    assert trace.status == "max_steps"
    assert sum(1 for s in trace.spans if s.kind == "llm") == 3


async def test_tool_timeout_is_a_tool_error_and_episode_timeout_ends_it(cfg, scripted):
    async def slow(seconds: float) -> str:
        """Sleep.

        Args:
            seconds: how long
        """
        await asyncio.sleep(seconds)
        return "woke"

    slow_tool = Tool.from_function(slow)
    cfg.agent.tool_timeout_s = 0.2
    scripted(call("slow", seconds=5), AIMessage("ok then"))
    async with Agent(cfg, engine=object(), tools=[slow_tool]) as agent:
        res = await agent.run("sleep", tools=["slow"])
        trace, _ = spans_of(agent, res.trace_id)
        assert res.status == "ok"
        span = next(s for s in trace.spans if s.kind == "tool")
        assert span.status == "error" and "timed out after 0.2 s" in span.error

        scripted(AIMessage("late"), delay_s=2.0)
        res = await agent.run("too slow", tools=[], timeout_s=0.3)
        trace, _ = spans_of(agent, res.trace_id)
    assert res.status == "timeout" and "timed out" in res.error
    assert trace.status == "timeout"


async def test_subagent_steps_nest_under_the_orchestrators_call(cfg, scripted):
    researcher = SubagentConfig(
        name="researcher", description="Looks things up.", tools=["calculator"]
    )
    scripted(
        call("researcher", task="what is 6*7"),  # orchestrator delegates
        call("calculator", expression="6*7"),  # the subagent uses its tool
        AIMessage("42"),  # subagent answers
        AIMessage("The researcher says 42."),  # orchestrator answers
    )
    async with Agent(cfg, engine=object()) as agent:
        res = await agent.run("ask the researcher", tools=["researcher"], subagents=[researcher])
        trace, _ = spans_of(agent, res.trace_id)
    assert res.status == "ok" and "42" in res.answer
    by_id = {s.id: s for s in trace.spans}
    sub_span = next(s for s in trace.spans if s.kind == "subagent")
    assert sub_span.tool.result == "42"
    inner_agent = next(s for s in trace.spans if s.kind == "agent" and s.parent_id == sub_span.id)
    calc = next(s for s in trace.spans if s.kind == "tool" and s.name == "calculator")
    assert by_id[calc.parent_id].id == inner_agent.id
    assert inner_agent.attributes["subagent"] == "researcher"


async def test_a_subagent_call_with_an_invented_argument_is_named_back_to_the_model(cfg, scripted):
    # SmolLM2 writes {"task": ..., "arguments_type": "number"}: it used to fail with a
    # TypeError about run_subagent's signature, and the model repeated the call until max_steps
    researcher = SubagentConfig(name="researcher", description="Looks things up.", tools=[])
    model = scripted(
        call("researcher", task="what is 6*7", arguments_type="number"),
        call("researcher", task="what is 6*7"),
        AIMessage("42"),  # the subagent answers the well-formed call
        AIMessage("The researcher says 42."),
    )
    async with Agent(cfg, engine=object()) as agent:
        res = await agent.run("ask the researcher", tools=["researcher"], subagents=[researcher])
        trace, _ = spans_of(agent, res.trace_id)
    subs = sorted((s for s in trace.spans if s.kind == "subagent"), key=lambda s: s.start)
    assert [s.status for s in subs] == ["error", "ok"]
    error = subs[0].tool.error
    assert "unknown argument" in error and "arguments_type" in error
    assert "{task: string (required)}" in error and "TypeError" not in error
    # the model saw that message as the tool's answer, and the second call ran the subagent
    assert "unknown argument" in str(model.seen[1][-1].content)
    assert res.status == "ok" and subs[1].tool.result == "42"


async def test_subagent_depth_limit(cfg, scripted):
    cfg.agent.max_subagent_depth = 1
    a = SubagentConfig(name="a", description="first", tools=["b"])
    b = SubagentConfig(name="b", description="second", tools=["calculator"])
    model = scripted(call("a", task="go"), AIMessage("inner done"), AIMessage("outer done"))
    async with Agent(cfg, engine=object()) as agent:
        res = await agent.run("nest", tools=["a"], subagents=[a, b])
    assert res.status == "ok"
    # the subagent at depth 1 was offered no subagent 'b'
    assert res.answer == "outer done" and len(model.seen) == 3


async def test_thread_resumes_from_the_sqlite_checkpoint(cfg, scripted):
    model = scripted(AIMessage("Hello Ada."), AIMessage("Your name is Ada."))
    async with Agent(cfg, engine=object()) as agent:
        await agent.run("My name is Ada.", tools=[], thread_id="th-1")
    async with Agent(cfg, engine=object()) as agent:  # a new agent: only the checkpoint remembers
        res = await agent.run("What is my name?", tools=[], thread_id="th-1")
    assert res.answer == "Your name is Ada."
    second_prompt = [m.content for m in model.seen[-1]]
    assert "My name is Ada." in second_prompt and "Hello Ada." in second_prompt
    assert cfg.workspace.checkpoints_db.exists()


async def test_unknown_tool_name_is_reported_to_the_model(cfg, scripted):
    model = scripted(call("nonexistent", x=1), AIMessage("sorry"))
    async with Agent(cfg, engine=object()) as agent:
        res = await agent.run("x", tools=["calculator"])
    assert res.status == "ok"
    tool_msg = [m for m in model.seen[-1] if m.type == "tool"][0]
    assert "unknown tool 'nonexistent'" in tool_msg.content


async def test_backend_failure_fails_the_episode_not_the_caller(cfg, scripted):
    def boom():
        raise ConnectionError("server went away")

    scripted(boom)
    async with Agent(cfg, engine=object()) as agent:
        res = await agent.run("x", tools=[])
        trace, _ = spans_of(agent, res.trace_id)
    assert res.status == "error" and "server went away" in res.error
    assert trace.status == "error"
    llm = next(s for s in trace.spans if s.kind == "llm")
    assert llm.status == "error" and "server went away" in llm.error


def test_demos_are_prompt_only_and_counted(cfg, scripted):
    demo = [
        {"role": "user", "content": "What is 2*3?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "d1",
                    "type": "function",
                    "function": {"name": "calculator", "arguments": {"expression": "2*3"}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "d1", "name": "calculator", "content": "6"},
        {"role": "assistant", "content": "6"},
    ]
    scripted(AIMessage("4"))

    async def go():
        async with Agent(cfg, engine=object()) as agent:
            res = await agent.run("What is 2+2?", tools=["calculator"], demos=demo)
            return res, agent.tracer.store.get(res.trace_id)

    res, trace = asyncio.run(go())
    llm = next(s for s in trace.spans if s.kind == "llm")
    assert trace.metadata["demo_messages"] == 4
    assert [m["role"] for m in llm.llm.messages] == [
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
        "user",
    ]
    assert (
        json.dumps(llm.llm.messages[2]["tool_calls"][0]["function"]["arguments"])
        == '{"expression": "2*3"}'
    )
    assert [m["content"] for m in res.messages] == ["What is 2+2?", "4"]


async def test_a_tool_of_an_mcp_server_that_did_not_start_is_an_error_naming_it(cfg, scripted):
    import sys

    from tools.schemas import McpServerConfig

    cfg.mcp = [
        McpServerConfig(name="ghost", command=sys.executable, args=["-c", "raise SystemExit(3)"])
    ]
    scripted(call("ghost__lookup", key="x"), AIMessage("could not look it up"))
    async with Agent(cfg, engine=object()) as agent:
        res = await agent.run("Look x up.", tools=["calculator", "ghost__lookup"])
        trace, spans = spans_of(agent, res.trace_id)
    assert res.status == "ok" and res.answer == "could not look it up"
    tool_span = next(s for s in trace.spans if s.kind == "tool")
    assert tool_span.status == "error" and "MCP server 'ghost' is down" in tool_span.error
