"""Process-wide runtime pieces: the loaded model, the trace store, adapter resolution.

The base model is loaded once per process and shared by every agent, subagent, eval worker
and judge in it; adapters are loaded into that one engine by name.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

from agent.config import Config

_engines: dict[str, Any] = {}
_VERSION = re.compile(r"v\d+")
_engines_lock = threading.Lock()


def get_engine(cfg: Config):
    """The process's LocalEngine for the configured model (loaded on first use)."""
    from agent.backends import LocalEngine
    from agent.models import model_dir

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


def open_registry(cfg: Config):
    from tuner.registry import Registry

    return Registry(cfg.workspace.adapters)


def resolve_adapter(cfg: Config, engine: Any, request: str | None) -> str | None:
    """Turn an adapter request into the name the backend serves it under.

    None/"base" -> None (the base model). "active" -> the registry's active version, or None.
    "vN" -> that version. A folder path -> loaded under its folder name. With the local
    backend the adapter is loaded into the engine on first use (without reloading the base);
    with the openai backend (vLLM) it is loaded into the server on first use, under that name.
    """
    if request in (None, "", "base"):
        return None
    path: Path | None = None
    name = request
    candidate = Path(request).expanduser()
    if candidate.is_dir() and (candidate / "adapter_config.json").is_file():
        path, name = candidate.resolve(), candidate.name
    else:
        if request != "active" and not _VERSION.fullmatch(request):
            # not a registry name: one the backend serves on its own (a GRPO policy, say)
            if cfg.model.backend == "openai":
                return request
            if engine is not None and request in engine.adapters():
                return request
        registry = open_registry(cfg)
        record = registry.resolve(request)
        if record is None:
            return None
        name = record.version
        path = registry.path(record.version)
    if cfg.model.backend == "local" and engine is not None and name not in engine.adapters():
        engine.load_adapter(name, path)
    elif cfg.model.backend == "openai" and cfg.model.base_url:
        from agent.backends.openai import ensure_served

        ensure_served(cfg.model.base_url, name, path)
    return name


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

    from agent.backends import make_chat_model

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


def reloader_for(cfg: Config, engine: Any):
    """How a promotion reaches running agents: the in-process engine, or vLLM over HTTP."""
    from tuner.reload import LocalReloader, VllmReloader

    if cfg.model.backend == "openai":
        if not cfg.model.base_url:
            raise ValueError("[model] backend = 'openai' needs [model] base_url to reload adapters")
        return VllmReloader(cfg.model.base_url)
    return LocalReloader(engine)
