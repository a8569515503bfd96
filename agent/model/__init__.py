"""Model backends behind one LangChain chat-model interface: local (in process) or openai."""

from __future__ import annotations

from typing import Any

from langchain_core.language_models import BaseChatModel

from agent.config import Config
from agent.model.chat_local import ChatLocal
from agent.model.engine import Completion, LocalEngine, Sampling

__all__ = ["ChatLocal", "Completion", "LocalEngine", "Sampling", "make_chat_model"]


def make_chat_model(
    cfg: Config, *, engine: LocalEngine | None = None, adapter: str | None = None, **sampling: Any
) -> BaseChatModel:
    """The chat model `cfg.model.backend` names, with `[model]` sampling defaults that
    `sampling` (temperature, top_p, max_tokens, seed, stop) overrides.

    local: over `engine` (loaded from `cfg` if not given; pass one to share it). openai: a
    ChatOpenAI on `cfg.model.base_url`, the adapter chosen by the request's model name.
    """
    m = cfg.model
    unknown = set(sampling) - {"temperature", "top_p", "max_tokens", "seed", "stop"}
    if unknown:
        raise TypeError(
            f"make_chat_model got unknown settings {sorted(unknown)}: "
            "use temperature, top_p, max_tokens, seed, stop"
        )
    settings = {"temperature": m.temperature, "top_p": m.top_p, "max_tokens": m.max_new_tokens}
    settings.update(sampling)
    if m.backend == "openai":
        from agent.model.openai import make_openai_chat_model

        return make_openai_chat_model(cfg, adapter=adapter, **settings)
    return ChatLocal(engine=engine or LocalEngine.from_config(cfg), adapter=adapter, **settings)
