"""The workspace's shared pieces: the loaded model, the trace store, the tracer, the Chroma
collection, and one plain model turn.

The base model is loaded once per process and shared by every agent, subagent, eval worker
and judge in it; adapters are loaded into that one engine by name.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent.config import Config
from tools import Tool, ToolError, local_tools
from traces.datasets import DatasetFilters, DatasetResult, build_dataset

_engines: dict[str, Any] = {}
_engines_lock = threading.Lock()


def get_engine(cfg: Config):
    """The process's LocalEngine for the configured model (loaded on first use)."""
    from agent.model import LocalEngine
    from agent.model.files import model_dir

    path = model_dir(cfg)
    key = f"{path}|{cfg.model.dtype}|{cfg.model.device}"
    with _engines_lock:
        if key not in _engines:
            _engines[key] = LocalEngine.from_config(cfg)
        return _engines[key]


def trace_db_path(cfg: Config) -> Path:
    return Path(cfg.traces.db).expanduser() if cfg.traces.db else cfg.workspace.traces_db


def open_store(cfg: Config):
    from traces.store import TraceStore

    cfg.workspace.ensure()
    return TraceStore(trace_db_path(cfg))


def open_tracer(cfg: Config):
    """A Tracer writing to the workspace's store, exporting live to OTLP when configured."""

    from traces.tracer import tracer_from_config

    cfg.workspace.ensure()
    return tracer_from_config(cfg.traces, trace_db_path(cfg))


def open_collection(cfg: Config, name: str | None = None):
    """The Chroma collection `name` (default `[retrieval] collection`), embedded in the
    workspace or on the configured Chroma server, with selftune's embedding function."""
    from retrieval import get_collection, open_client

    client = open_client(cfg.retrieval, cfg.workspace.chroma)
    return get_collection(client, name or cfg.retrieval.collection)


def judge_model(cfg: Config, *, max_tokens: int = 128, adapter: str | None = None):
    """The LLM judge (traces.judge): `cfg`'s model, greedy, on the process's one engine for it;
    no adapter unless `adapter` names one ("v3", a folder). What `[tuner.grpo] judge` ranks
    groups with and `[improve] judge` grades unmatched traffic with: on the base model's config,
    or on the teacher's (tuner.teacher.make_judge)."""
    from agent.model import make_chat_model
    from agent.model.adapters import resolve_adapter

    engine = get_engine(cfg) if cfg.model.backend == "local" else None
    return make_chat_model(
        cfg,
        engine=engine,
        adapter=resolve_adapter(cfg, engine, adapter),
        max_tokens=max_tokens,
        temperature=0.0,
    )


def chat_once(
    cfg: Config,
    prompt: str,
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
    adapter: str | None = None,
) -> str:
    """One model turn with no tools (what `selftune chat` prints)."""
    from langchain_core.messages import HumanMessage

    from agent.model import make_chat_model
    from agent.model.adapters import resolve_adapter

    engine = get_engine(cfg) if cfg.model.backend == "local" else None
    sampling: dict[str, Any] = {}
    if max_tokens is not None:
        sampling["max_tokens"] = max_tokens
    if temperature is not None:
        sampling["temperature"] = temperature
    model = make_chat_model(
        cfg,
        engine=engine,
        adapter=resolve_adapter(cfg, engine, adapter or cfg.model.adapter),
        **sampling,
    )
    reply = model.invoke([HumanMessage(prompt)])
    return reply.content if isinstance(reply.content, str) else str(reply.content)


def build_from_config(
    cfg: Config,
    kind: str,
    out: str | Path | None = None,
    filters: DatasetFilters = DatasetFilters(),
    formats: Sequence[str] = ("trl",),
) -> DatasetResult:
    """Build a dataset from the workspace's traces; `out` defaults to
    `<workspace>/datasets/<env>-<kind>`."""
    from agent.envs import environment_tasks

    tasks = None
    if filters.env:
        name, tasks = environment_tasks(filters.env, cfg)
        filters = replace(filters, env=name)
    out = Path(out) if out else cfg.workspace.datasets / f"{filters.env or 'all'}-{kind}"
    store = open_store(cfg)
    try:
        return build_dataset(
            store,
            kind,
            out,
            filters,
            formats=formats,
            tasks=tasks,
            scrub_patterns=cfg.traces.scrub_patterns,
        )
    finally:
        store.close()


@asynccontextmanager
async def open_tools(cfg: Config, with_mcp: bool = True) -> AsyncIterator[dict[str, Tool]]:
    """Every tool the agent could use, MCP servers' included (sessions open for the block)."""
    from tools.mcp_client import McpManager

    tools = local_tools(cfg.agent.tool_modules)
    if with_mcp and cfg.mcp:
        async with McpManager(cfg.mcp) as manager:
            yield {**tools, **{t.name: t for t in manager.tools()}}
    else:
        yield tools


async def call_tool(cfg: Config, name: str, arguments: dict) -> str:
    """Call one tool by name (starting MCP servers only if the name is an MCP tool's)."""
    async with open_tools(cfg, with_mcp="__" in name) as tools:
        if name not in tools:
            raise ToolError(f"unknown tool {name!r}: available are {sorted(tools)}")
        return await tools[name].ainvoke(arguments)
