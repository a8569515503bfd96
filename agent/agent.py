"""The orchestrator: a small LangGraph graph (model -> tools -> model ...) with every step traced.

    async with Agent.from_config(cfg) as agent:
        result = await agent.run("What is 48 * 97?")
        result.answer, result.status, result.trace_id

Why our own StateGraph rather than `create_agent`: each model call, tool call, retrieval and
subagent call must become a span with exactly what was sent and returned, tool calls that
cannot be parsed must go back to the model as error tool messages, and the step limit must end
the episode with status `max_steps` rather than LangGraph's recursion error. Those are the
graph's two nodes; LangGraph still owns the loop, the state and the SQLite checkpoints
(so `run(..., thread_id=...)` resumes a conversation).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, TypedDict

from langchain_core.messages import (
    AIMessage,
    AnyMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages

from agent.config import Config, SubagentConfig, load_config
from agent.messages import from_message_dicts, to_message_dicts
from agent.model.router import ROUTED, Decision
from tools.base import Tool, ToolError
from traces.schemas import LlmData, RetrievalData, ToolCall, ToolData
from traces.tracer import Tracer

log = logging.getLogger("selftune.agent")


@dataclass
class RunResult:
    """What one episode produced. `messages` are OpenAI-style dicts, demos excluded."""

    answer: str | None
    status: str  # ok | max_steps | timeout | error
    trace_id: str
    thread_id: str | None = None
    steps: int = 0
    error: str | None = None
    adapter: str | None = None
    route: str | None = None  # with `[model] adapter = "routed"`: the route that answered
    messages: list[dict[str, Any]] = field(default_factory=list)
    latency_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EpisodeState(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]
    steps: int


@dataclass
class _Limits:
    max_steps: int
    tool_timeout_s: float


@dataclass(frozen=True)
class _Parent:
    """What a subagent inherits from the episode that calls it, unless its config says
    otherwise: the episode's adapter (so a candidate under evaluation answers for its
    subagents too, not the registry's active one), whether that adapter was routed (then a
    role gets its own route's), and the episode's sampling (max tokens, temperature, seed)."""

    adapter: str | None
    routed: bool
    sampling: dict[str, Any]


@dataclass
class _Scope:
    """Everything one graph run needs; a subagent gets its own scope inside the same trace."""

    model: Any  # a LangChain chat model with tools bound
    tools: dict[str, Tool]
    system_prompt: str
    demos: list[BaseMessage]
    limits: _Limits
    depth: int
    adapter: str | None
    model_name: str


class Agent:
    """The orchestrator. Holds the loaded model (or the OpenAI client), the tool layer, the
    open MCP sessions and the trace store for as long as it lives."""

    def __init__(
        self,
        cfg: Config,
        *,
        engine: Any = None,
        tracer: Tracer | None = None,
        tools: Sequence[Tool] = (),
        adapter: str | None = None,
        checkpoints: bool = True,
        chat_model: Any = None,
    ):
        """`chat_model`: a LangChain chat model that answers in place of `[model]` (the
        reference policy of agent.envs.bootstrap does); traced like any model."""
        self.cfg = cfg
        self._chat_model = chat_model
        self._engine = engine
        self._tracer = tracer
        self._extra_tools = {t.name: t for t in tools}
        self._adapter_request = adapter if adapter is not None else cfg.model.adapter
        self._use_checkpoints = checkpoints
        self._stack: AsyncExitStack | None = None
        self._mcp = None
        self._checkpointer = None
        self._tool_cache: dict[str, Tool] | None = None
        self._graph = None
        self._graph_threads = None
        self._started = False
        self._start_lock = asyncio.Lock()
        self._route_classifier: Any = False  # loaded on the first routed episode

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: Config | str | None = None, **kwargs: Any) -> Agent:
        """An agent for `cfg` (a Config, a path to a toml file, or None for ./selftune.toml)."""
        if not isinstance(cfg, Config):
            cfg = load_config(cfg)
        return cls(cfg, **kwargs)

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Load the model, open MCP sessions and the checkpoint store. Idempotent."""
        async with self._start_lock:
            if self._started:
                return
            from agent.workspace import get_engine, open_tracer

            self.cfg.workspace.ensure()
            self._stack = AsyncExitStack()
            if self.cfg.model.backend == "local" and self._engine is None:
                self._engine = await asyncio.to_thread(get_engine, self.cfg)
            if self._tracer is None:
                self._tracer = open_tracer(self.cfg)
            if self.cfg.mcp:
                from tools.mcp_client import McpManager

                self._mcp = McpManager(self.cfg.mcp)
                await self._stack.enter_async_context(self._mcp)
            if self._use_checkpoints:
                self._checkpointer = await self._stack.enter_async_context(
                    _open_checkpointer(self.cfg.workspace.checkpoints_db)
                )
            # Episodes without a thread id (evals, collection) skip checkpointing entirely.
            self._graph = self._build_graph()
            self._graph_threads = (
                self._build_graph(self._checkpointer) if self._checkpointer else None
            )
            self._started = True

    async def aclose(self) -> None:
        if self._stack is not None:
            await self._stack.aclose()
        if self._tracer is not None:
            self._tracer.flush()
        self._started = False

    @property
    def tracer(self) -> Tracer:
        assert self._tracer is not None, "call `await agent.start()` first"
        return self._tracer

    @property
    def engine(self) -> Any:
        return self._engine

    # -- tools --------------------------------------------------------------------------------

    def available_tools(self) -> dict[str, Tool]:
        """Every tool this agent can offer, by name: built-ins, module tools, MCP tools,
        subagents and tools passed in. `search` is built on first request (it loads Chroma)."""
        if self._tool_cache is None:
            from tools.catalog import local_tools

            found = local_tools(self.cfg.agent.tool_modules)
            if self._mcp is not None:
                for t in self._mcp.tools():
                    found[t.name] = t
            found.update(self._extra_tools)
            self._tool_cache = found
        return self._tool_cache

    def _resolve_tools(
        self,
        names: Sequence[str],
        subagents: Sequence[SubagentConfig],
        depth: int,
        extra: Sequence[Tool],
        parent: _Parent,
    ) -> dict[str, Tool]:
        pool = dict(self.available_tools())
        pool.update({t.name: t for t in extra})
        by_sub = {s.name: s for s in subagents}
        chosen: dict[str, Tool] = {}
        for name in names:
            if name in pool:
                chosen[name] = pool[name]
            elif name == "search":
                chosen[name] = self._search_tool()
            elif self._mcp is not None and (down := self._mcp.unavailable_tool(name)):
                chosen[name] = down  # its server did not start: calls say so, the rest works
            elif name in by_sub:
                if depth >= self.cfg.agent.max_subagent_depth:
                    log.warning("subagent %s not offered: depth limit %d", name, depth)
                    continue
                chosen[name] = self._subagent_tool(by_sub[name], subagents, depth, extra, parent)
            else:
                known = sorted(set(pool) | {"search"} | set(by_sub))
                raise ValueError(f"unknown tool {name!r}; known tools: {', '.join(known)}")
        return chosen

    def _search_tool(self) -> Tool:
        if "search" not in self._extra_tools:
            from agent.workspace import open_collection
            from retrieval import make_search_tool

            coll = open_collection(self.cfg)
            r = self.cfg.retrieval
            self._extra_tools["search"] = make_search_tool(
                coll, k=r.top_k, ranking=r.ranking, passage=r.passage
            )
            self._tool_cache = None
        return self._extra_tools["search"]

    def _subagent_tool(
        self,
        sub: SubagentConfig,
        subagents: Sequence[SubagentConfig],
        depth: int,
        extra: Sequence[Tool],
        parent: _Parent,
    ) -> Tool:
        agent = self

        async def run_subagent(task: str) -> str:
            return await agent._run_subagent(sub, task, subagents, depth + 1, extra, parent)

        return Tool(
            name=sub.name,
            description=sub.description + " Give it a self-contained task; it answers in text.",
            parameters={
                "type": "object",
                "properties": {"task": {"type": "string", "description": "the task to hand over"}},
                "required": ["task"],
                # an extra argument (a small model invents some) is named back to the model
                # with the signature, instead of a TypeError from run_subagent
                "additionalProperties": False,
            },
            func=run_subagent,
            source="subagent",
        )

    # -- the graph ----------------------------------------------------------------------------

    def _build_graph(self, checkpointer=None):
        g = StateGraph(EpisodeState)
        g.add_node("model", self._model_node)
        g.add_node("tools", self._tools_node)
        g.add_edge(START, "model")
        g.add_conditional_edges("model", self._after_model, {"tools": "tools", END: END})
        g.add_edge("tools", "model")
        return g.compile(checkpointer=checkpointer)

    @staticmethod
    def _scope(config: RunnableConfig) -> _Scope:
        return config["configurable"]["scope"]

    async def _model_node(self, state: EpisodeState, config: RunnableConfig) -> dict:
        scope = self._scope(config)
        prompt: list[BaseMessage] = [
            SystemMessage(scope.system_prompt),
            *scope.demos,
            *state["messages"],
        ]
        sent = to_message_dicts(prompt)
        schemas = [t.schema() for t in scope.tools.values()]
        with self.tracer.span(
            "llm", f"chat {scope.model_name}", llm=LlmData(messages=sent, tools=schemas)
        ) as span:
            reply: AIMessage = await scope.model.ainvoke(prompt)
            meta = reply.response_metadata or {}
            usage = reply.usage_metadata or {}
            span.llm.completion = meta.get("raw_completion") or _text(reply)
            span.llm.model = meta.get("model_name") or scope.model_name
            span.llm.adapter = meta.get("adapter", scope.adapter)
            span.llm.finish_reason = meta.get("finish_reason")
            span.llm.prompt_token_ids = meta.get("prompt_token_ids")
            span.llm.completion_token_ids = meta.get("completion_token_ids")
            span.llm.sampling = meta.get("sampling") or {}
            span.llm.input_tokens = usage.get("input_tokens")
            span.llm.output_tokens = usage.get("output_tokens")
            raw = _raw_arguments(reply, span.llm.completion)
            span.llm.tool_calls = [
                ToolCall(
                    id=c["id"] or "",
                    name=c["name"],
                    arguments=c["args"],
                    raw_arguments=raw[i] if i < len(raw) else json.dumps(c["args"]),
                )
                for i, c in enumerate(reply.tool_calls)
            ] + [
                ToolCall(
                    id=c.get("id") or "",
                    name=c.get("name") or "",
                    raw_arguments=c.get("args") or "",
                    error=c.get("error") or "could not parse tool call",
                )
                for c in reply.invalid_tool_calls
            ]
        return {"messages": [reply], "steps": state.get("steps", 0) + 1}

    def _after_model(self, state: EpisodeState, config: RunnableConfig) -> str:
        last = state["messages"][-1]
        wants_tools = isinstance(last, AIMessage) and (last.tool_calls or last.invalid_tool_calls)
        if not wants_tools:
            return END
        if state.get("steps", 0) >= self._scope(config).limits.max_steps:
            return END  # the caller sees unanswered tool calls and reports max_steps
        return "tools"

    async def _tools_node(self, state: EpisodeState, config: RunnableConfig) -> dict:
        scope = self._scope(config)
        last: AIMessage = state["messages"][-1]
        calls = [
            self._call_tool(scope, c["id"] or f"call_{i}", c["name"], c["args"])
            for i, c in enumerate(last.tool_calls)
        ]
        results = list(await asyncio.gather(*calls))
        for i, bad in enumerate(last.invalid_tool_calls):
            call_id = bad.get("id") or f"invalid_{i}"
            msg = bad.get("error") or "could not parse tool call"
            with self.tracer.span(
                "tool",
                bad.get("name") or "unparsed",
                tool=ToolData(name=bad.get("name") or "?", call_id=call_id),
            ) as span:
                span.status, span.error = "error", msg
                span.tool.error = msg
            results.append(
                ToolMessage(
                    content=f"Error: {msg}",
                    tool_call_id=call_id,
                    name=bad.get("name") or "",
                    status="error",
                )
            )
        return {"messages": results}

    async def _call_tool(self, scope: _Scope, call_id: str, name: str, args: dict) -> ToolMessage:
        tool = scope.tools.get(name)
        kind = "subagent" if tool is not None and tool.source == "subagent" else "tool"
        if tool is not None and hasattr(tool, "asearch"):
            kind = "retrieval"
        data = ToolData(
            name=name, call_id=call_id, arguments=args, server=getattr(tool, "server", None)
        )
        with self.tracer.span(kind, name, tool=data) as span:
            try:
                if tool is None:
                    raise ToolError(
                        f"unknown tool {name!r}; available: {', '.join(scope.tools) or 'none'}"
                    )
                if kind == "retrieval":
                    text = await self._retrieve(tool, args, span, scope.limits.tool_timeout_s)
                elif kind == "subagent":
                    text = await tool.ainvoke(args)  # a subagent has its own limits
                else:
                    text = await asyncio.wait_for(tool.ainvoke(args), scope.limits.tool_timeout_s)
                span.tool.result = text
                return ToolMessage(content=text, tool_call_id=call_id, name=name)
            except TimeoutError:
                msg = f"tool {name} timed out after {scope.limits.tool_timeout_s:g} s"
            except ToolError as e:
                msg = str(e)
            except Exception as e:  # noqa: BLE001 - a tool's bug must not end the episode
                msg = f"tool {name} failed: {type(e).__name__}: {e}"
            span.status, span.error, span.tool.error = "error", msg, msg
            return ToolMessage(
                content=f"Error: {msg}", tool_call_id=call_id, name=name, status="error"
            )

    async def _retrieve(self, tool: Tool, args: dict, span, timeout: float) -> str:
        from retrieval import format_passages

        query = str(args.get("query", ""))
        if not query:
            raise ToolError('search needs a \'query\' argument, e.g. {"query": "vacation policy"}')
        passages = await asyncio.wait_for(tool.asearch(query), timeout)
        span.retrieval = RetrievalData(
            query=query,
            collection=tool.collection.name,
            ids=[p.id for p in passages],
            scores=[p.score for p in passages],
            texts=[p.text for p in passages],
            sources=[p.source for p in passages],
        )
        return format_passages(passages)

    # -- running ------------------------------------------------------------------------------

    def _make_scope(
        self,
        *,
        tool_names: Sequence[str],
        subagents: Sequence[SubagentConfig],
        extra_tools: Sequence[Tool],
        system_prompt: str,
        demos: Sequence[dict],
        adapter: str | None,
        max_steps: int,
        depth: int,
        sampling: dict[str, Any],
        routed: bool = False,
    ) -> _Scope:
        from agent.model import make_chat_model

        parent = _Parent(adapter=adapter, routed=routed, sampling=dict(sampling))
        tools = self._resolve_tools(tool_names, subagents, depth, extra_tools, parent)
        model = self._chat_model or make_chat_model(
            self.cfg, engine=self._engine, adapter=adapter, **sampling
        )
        if tools:
            model = model.bind_tools([t.schema() for t in tools.values()])
        return _Scope(
            model=model,
            tools=tools,
            system_prompt=system_prompt,
            demos=from_message_dicts(list(demos)),
            limits=_Limits(max_steps=max_steps, tool_timeout_s=self.cfg.agent.tool_timeout_s),
            depth=depth,
            adapter=adapter,
            model_name=self.cfg.model.name,
        )

    async def _run_graph(
        self, scope: _Scope, new_messages: list[BaseMessage], thread_id: str | None
    ):
        config: dict[str, Any] = {
            "configurable": {"scope": scope},
            "recursion_limit": 4 * scope.limits.max_steps + 8,
        }
        graph = self._graph
        if thread_id is not None:
            if self._graph_threads is None:
                raise ValueError(
                    "this agent was made with checkpoints=False: it cannot resume threads"
                )
            config["configurable"]["thread_id"] = thread_id
            graph = self._graph_threads
        state = await graph.ainvoke({"messages": new_messages, "steps": 0}, config)
        messages: list[BaseMessage] = state["messages"]
        last = messages[-1]
        if isinstance(last, AIMessage) and (last.tool_calls or last.invalid_tool_calls):
            return messages, None, "max_steps", state.get("steps", 0)
        return messages, _text(last), "ok", state.get("steps", 0)

    async def _run_subagent(
        self,
        sub: SubagentConfig,
        task: str,
        subagents: Sequence[SubagentConfig],
        depth: int,
        extra: Sequence[Tool],
        parent: _Parent,
    ) -> str:
        # its own adapter if its config names one; else a routed episode's role route; else
        # the adapter the calling episode runs with
        request = sub.adapter or (ROUTED if parent.routed else None)
        decision = None
        if request == ROUTED:  # a role with a route of its own gets that route's adapter
            from agent.model.router import choose

            decision = choose(self.cfg, role=sub.name)
            request = decision.adapter
        adapter = self.resolve_adapter(request) if request else parent.adapter
        scope = self._make_scope(
            tool_names=sub.tools,
            subagents=subagents,
            extra_tools=extra,
            system_prompt=sub.system_prompt,
            demos=(),
            adapter=adapter,
            max_steps=sub.max_steps,
            depth=depth,
            sampling=parent.sampling,
            routed=parent.routed,
        )
        # Nested under the orchestrator's subagent span; a separate graph run, no checkpoint thread.
        with self.tracer.span("agent", sub.name) as span:
            span.attributes.update(
                {"subagent": sub.name, "depth": depth, "task": task, "adapter": adapter}
            )
            if decision is not None:
                span.attributes.update(decision.as_metadata())
            _, answer, status, steps = await self._run_graph(scope, [HumanMessage(task)], None)
            span.attributes.update({"status": status, "steps": steps})
        if status != "ok":
            raise ToolError(f"subagent {sub.name} stopped with status {status} after {steps} steps")
        return answer or ""

    def resolve_adapter(self, request: str | None) -> str | None:
        """'active' -> the registry's active version name (or None for the base model); a
        version or folder is loaded into the local engine on first use."""
        from agent.model.adapters import resolve_adapter

        return resolve_adapter(self.cfg, self._engine, request)

    def current_adapter(self) -> str | None:
        return self.resolve_adapter(self._adapter_request)

    async def choose_adapter(
        self,
        request: str | None,
        *,
        route: str | None = None,
        env: str | None = None,
        task: str | None = None,
    ) -> tuple[str | None, Decision | None]:
        """The adapter name one episode runs with, and the routing decision behind it when
        the request (default: the agent's `adapter`) is "routed" (agent/model/router.py)."""
        request = request if request is not None else self._adapter_request
        if request != ROUTED:
            return self.resolve_adapter(request), None
        from agent.model.router import choose, load

        if self._route_classifier is False:
            self._route_classifier = load(self.cfg.workspace.router)
        decision = await asyncio.to_thread(  # the classifier embeds: off the event loop
            choose,
            self.cfg,
            route=route,
            env=env,
            text=task,
            classifier=self._route_classifier,
        )
        return self.resolve_adapter(decision.adapter), decision

    async def run(
        self,
        task: str,
        *,
        tools: Sequence[str] | None = None,
        extra_tools: Sequence[Tool] = (),
        subagents: Sequence[SubagentConfig] | None = None,
        system_prompt: str | None = None,
        demos: Sequence[dict] = (),
        history: Sequence[dict] = (),
        thread_id: str | None = None,
        trace_id: str | None = None,
        env: str | None = None,
        task_id: str | None = None,
        tags: Sequence[str] = (),
        metadata: dict[str, Any] | None = None,
        adapter: str | None = None,
        route: str | None = None,
        max_steps: int | None = None,
        timeout_s: float | None = None,
        **sampling: Any,
    ) -> RunResult:
        """Run one episode and return its answer, status and trace id. Never raises for what
        happens inside the episode (tool errors, timeouts, step limits, backend failures): those
        end up in `status`/`error` and in the trace. The one exception: a model server that
        cannot be reached (`ModelServerDown`) is recorded, then raised, because every episode
        after it would fail the same way and an eval would score the outage as the model's.

        `history` is earlier turns of the conversation (OpenAI-style dicts) that go before
        `task` in the episode (they are part of the conversation, unlike demos); `trace_id`
        names the trace up front (a server returns it before the episode ends).

        With the adapter "routed" (the argument, or `[model] adapter`), the episode's adapter is
        its route's: `route` (or `metadata["route"]`), else `env`, else the route classifier on
        `task`, else the global active; the trace's metadata records the decision."""
        await self.start()
        started = time.perf_counter()
        adapter_name, decision = await self.choose_adapter(
            adapter,
            route=route or (metadata or {}).get("route"),
            env=env,
            task=task,
        )
        subs = list(self.cfg.agent.subagents if subagents is None else subagents)
        names = list(self.cfg.agent.tools if tools is None else tools)
        for t in extra_tools:
            if t.name not in names:
                names.append(t.name)
        meta = dict(metadata or {})
        meta.update(
            {
                "demo_messages": len(demos),
                "thread_id": thread_id,
            }
        )
        if decision is not None:
            meta.update(decision.as_metadata())
        down: Exception | None = None
        async with self.tracer.trace(
            env=env,
            task_id=task_id,
            model=self.cfg.model.name,
            adapter=adapter_name,
            tags=list(tags),
            metadata=meta,
            trace_id=trace_id,
        ) as trace:
            result = RunResult(
                answer=None,
                status="error",
                trace_id=trace.id,
                thread_id=thread_id,
                adapter=adapter_name,
                route=decision.route if decision is not None else None,
            )
            with self.tracer.span("agent", "orchestrator") as root:
                root.attributes.update({"task": task, "tools": names})
                try:
                    scope = self._make_scope(
                        tool_names=names,
                        subagents=subs,
                        extra_tools=extra_tools,
                        system_prompt=system_prompt or self.cfg.agent.system_prompt,
                        demos=demos,
                        adapter=adapter_name,
                        max_steps=max_steps or self.cfg.agent.max_steps,
                        depth=0,
                        sampling=sampling,
                        routed=decision is not None,
                    )
                    messages, answer, status, steps = await asyncio.wait_for(
                        self._run_graph(
                            scope,
                            [*from_message_dicts(list(history)), HumanMessage(task)],
                            thread_id,
                        ),
                        timeout_s or self.cfg.agent.episode_timeout_s,
                    )
                    result.answer, result.status, result.steps = answer, status, steps
                    result.messages = to_message_dicts(messages)
                except TimeoutError:
                    result.status = "timeout"
                    result.error = f"episode timed out after {timeout_s or self.cfg.agent.episode_timeout_s:g} s"
                except Exception as e:  # noqa: BLE001 - the episode fails, the caller does not
                    from agent.model.openai import ModelServerDown

                    if isinstance(e, ModelServerDown):
                        down = e  # recorded below, then it stops the command: no model to run
                        log.error("episode failed: %s", e)
                    else:
                        log.exception("episode failed")
                    result.status, result.error = "error", f"{type(e).__name__}: {e}"
                root.attributes["status"] = result.status
                if result.error:
                    root.status, root.error = "error", result.error
            trace.finish(status=result.status, answer=result.answer, error=result.error)
        if down is not None:
            down.trace_id = trace.id  # type: ignore[attr-defined] - where the failure is kept
            raise down
        result.latency_s = time.perf_counter() - started
        return result


def _text(msg: BaseMessage) -> str:
    content = msg.content
    if isinstance(content, str):
        return content
    return "".join(
        part.get("text", "") if isinstance(part, dict) else str(part) for part in content
    )


def _raw_arguments(reply: AIMessage, raw_completion: str) -> list[str]:
    """The argument text of each tool call exactly as the model wrote it: the server's string
    for an OpenAI-compatible backend, else the same parse of the raw completion that produced
    `reply.tool_calls` (LangChain keeps only the parsed dicts)."""
    wire = reply.additional_kwargs.get("tool_calls") or []
    if wire:
        return [str(c.get("function", {}).get("arguments", "")) for c in wire]
    from agent.model.parsing import parse_tool_calls

    return [c.raw_arguments for c in parse_tool_calls(raw_completion).calls]


class _open_checkpointer:
    """LangGraph's async SQLite checkpointer in the workspace, with WAL and synchronous=NORMAL
    (with SQLite's default pragmas every checkpointed step took ~3x as long)."""

    def __init__(self, path):
        self.path = path
        self._conn = None

    async def __aenter__(self):
        import aiosqlite
        from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

        self._conn = await aiosqlite.connect(str(self.path))
        await self._conn.execute("PRAGMA journal_mode=WAL")
        await self._conn.execute("PRAGMA synchronous=NORMAL")
        await self._conn.execute("PRAGMA busy_timeout=10000")
        return AsyncSqliteSaver(self._conn)

    async def __aexit__(self, *exc):
        await self._conn.close()


def ask_agent_tool(cfg: Config) -> Tool:
    """`ask_agent` for the MCP server: run this agent on a task; the agent starts on first use
    and stays up for the server's life."""
    holder: dict[str, Agent] = {}
    lock = asyncio.Lock()

    async def ask_agent(task: str) -> str:
        """Run the selftune agent on a task with its configured tools and return its answer,
        status and trace id as JSON.

        Args:
            task: the task, in plain words
        """
        async with lock:
            if "agent" not in holder:
                holder["agent"] = Agent(cfg, checkpoints=False)
                await holder["agent"].start()
        res = await holder["agent"].run(task)
        return json.dumps(
            {
                "answer": res.answer,
                "status": res.status,
                "trace_id": res.trace_id,
                "error": res.error,
            }
        )

    return Tool.from_function(ask_agent, source="agent")
