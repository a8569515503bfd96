"""The OpenAI-compatible backend: vLLM, selftune's own server, or any server speaking the protocol.

The adapter is chosen by the request's model name (vLLM serves each LoRA under its own name).
Token ids are asked for with vLLM's `"return_token_ids": true` and land in `response_metadata`
under the same keys as the local backend. When a server returns `<tool_call>` text in the content
and no parsed tool_calls (no tool parser configured), selftune's tolerant parser reads it.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from pathlib import Path
from typing import Any

import httpx
import openai
from langchain_core.messages import AIMessage
from langchain_core.messages.tool import invalid_tool_call, tool_call
from langchain_core.outputs import ChatResult
from langchain_openai import ChatOpenAI

from agent.config import Config
from agent.model.chat_local import response_metadata
from agent.model.parsing import parse_tool_calls
from agent.serving.vllm import VllmAdmin, server_root
from tools.errors import SelftuneError


class ModelServerError(SelftuneError, RuntimeError):
    """The OpenAI-compatible server failed a request; the message names the URL and the fix."""


class ModelServerDown(ModelServerError):
    """The server could not be reached at all: every later request would fail the same way, so
    the agent stops the command instead of recording each episode as the model's failure."""


class ChatOpenAICompatible(ChatOpenAI):
    """ChatOpenAI that records token ids, the adapter and the raw completion like ChatLocal."""

    adapter: str | None = None
    # vLLM's extension; set False for a server that rejects unknown request fields
    request_token_ids: bool = True
    seed: int | None = None

    def _generate(self, *args: Any, **kwargs: Any) -> ChatResult:
        try:
            return super()._generate(*args, **kwargs)
        except openai.APIError as e:
            raise self._explain(e) from e

    async def _agenerate(self, *args: Any, **kwargs: Any) -> ChatResult:
        try:
            return await super()._agenerate(*args, **kwargs)
        except openai.APIError as e:
            raise self._explain(e) from e

    def _explain(self, e: openai.APIError) -> ModelServerError:
        """The openai client's error, said with the server's URL and what to do."""
        url = self.openai_api_base
        if isinstance(e, openai.APIConnectionError):  # refused, reset mid-answer, timed out
            return ModelServerDown(
                f"the model server at {url} stopped answering ({type(e).__name__}: {e}). Is it "
                "running? Start it again with `selftune serve --engine vllm`, or set "
                '[model] backend = "local"'
            )
        status = getattr(e, "status_code", None)
        hint = (
            f"the server does not serve the model name {self.model_name!r}: load the adapter "
            "or check [model] name"
            if status == 404
            else "see the server's log"
        )
        return ModelServerError(f"the model server at {url} answered HTTP {status}: {e} ({hint})")

    def _get_request_payload(self, input_: Any, *, stop: list[str] | None = None, **kwargs: Any):
        payload = super()._get_request_payload(input_, stop=stop, **kwargs)
        if self.request_token_ids:
            payload["extra_body"] = {**(payload.get("extra_body") or {}), "return_token_ids": True}
        return payload

    def _create_chat_result(
        self, response: dict | openai.BaseModel, generation_info: dict | None = None
    ) -> ChatResult:
        result = super()._create_chat_result(response, generation_info)
        data = response if isinstance(response, dict) else response.model_dump(warnings=False)
        sampling = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "stop": list(self.stop or []) if not isinstance(self.stop, str) else [self.stop],
        }
        for gen, choice in zip(result.generations, data.get("choices") or [], strict=False):
            msg = gen.message
            if not isinstance(msg, AIMessage):
                continue
            content = msg.content if isinstance(msg.content, str) else ""
            if not msg.tool_calls and "<tool_call>" in content:
                _parse_into(msg, content)
            raw = choice.get("raw_completion") or _reconstruct(content, msg)
            msg.response_metadata = response_metadata(
                model_name=self.model_name,
                adapter=self.adapter,
                finish_reason=choice.get("finish_reason"),
                raw_completion=raw,
                prompt_token_ids=data.get("prompt_token_ids"),
                completion_token_ids=choice.get("token_ids"),
                sampling=sampling,
            )
            gen.generation_info = None  # langchain merges it into response_metadata otherwise
        # likewise llm_output (id, system_fingerprint, ...): usage is on the message already
        result.llm_output = None
        return result


def _parse_into(msg: AIMessage, content: str) -> None:
    """Fill tool_calls from `<tool_call>` text the server left in the content."""
    parsed = parse_tool_calls(content)
    msg.content = parsed.content
    msg.tool_calls = [tool_call(name=p.name, args=p.arguments, id=p.id) for p in parsed.calls]
    msg.invalid_tool_calls = [
        invalid_tool_call(name=None, args=None, id=None, error=e) for e in parsed.errors
    ]


def _reconstruct(content: str, msg: AIMessage) -> str:
    """The completion as the model wrote it, when the server parsed the calls out of it."""
    calls = [
        '<tool_call>{"name": ' + json.dumps(c["name"]) + ', "arguments": '
        f"{json.dumps(c['args'], ensure_ascii=False)}}}</tool_call>"
        for c in msg.tool_calls
    ]
    if not calls or "<tool_call>" in content:
        return content
    return "\n".join([content, *calls]) if content else "\n".join(calls)


_loop_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
    weakref.WeakKeyDictionary()
)


def _async_client() -> httpx.AsyncClient:
    """An HTTP client for the running event loop. langchain_openai otherwise shares one
    process-wide client, whose pooled connections die with the first loop that used them
    ("Event loop is closed" in the next `asyncio.run`)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return httpx.AsyncClient(timeout=None)  # made outside a loop: one of its own
    client = _loop_clients.get(loop)
    if client is None:
        client = _loop_clients[loop] = httpx.AsyncClient(
            timeout=None, limits=httpx.Limits(max_connections=256, max_keepalive_connections=64)
        )
    return client


_served: set[tuple[str, str, str]] = set()  # (server, name, path) known to be loaded


def ensure_served(base_url: str, name: str, path: str | Path, *, timeout_s: float = 120.0) -> None:
    """Make sure the server at `base_url` serves the LoRA adapter at `path` as `name`.

    vLLM only answers for adapters it has loaded, and it restarts empty: a registry version
    is loaded on first use (the path must be readable by the server at the same path). Raises
    VllmAdminError (a ValueError) with the fix when the server refuses.
    """
    admin = VllmAdmin(base_url, timeout_s=timeout_s)
    key = (admin.root, name, str(path))
    if key in _served:
        return
    if name not in admin.served():
        admin.load(name, path, exist_ok=True)
    _served.add(key)


def forget_served(base_url: str | None = None) -> None:
    """Forget what was loaded (after the server restarted, which empties it)."""
    if base_url is None:
        _served.clear()
        return
    root = server_root(base_url)
    _served.difference_update({k for k in _served if k[0] == root})


def make_openai_chat_model(
    cfg: Config,
    *,
    adapter: str | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_tokens: int = 256,
    seed: int | None = None,
    stop: list[str] | None = None,
) -> ChatOpenAICompatible:
    """A chat model on `cfg.model.base_url`; the request's model name is the adapter's name if
    one is given, else `cfg.model.name` (what the server serves the base model as)."""
    import os

    m = cfg.model
    if not m.base_url:
        raise ValueError(
            '[model] backend = "openai" needs [model] base_url, e.g. "http://127.0.0.1:8000/v1"'
        )
    api_key = os.environ.get(m.api_key_env) or "EMPTY"  # local servers take any key
    return ChatOpenAICompatible(
        model=adapter or m.name,
        base_url=m.base_url,
        api_key=api_key,
        adapter=adapter,
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        seed=seed,
        stop=stop,
        max_retries=1,
        http_async_client=_async_client(),
    )
