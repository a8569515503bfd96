"""The OpenAI-compatible backend: vLLM, selftune's own server, or any server speaking the protocol.

The adapter is chosen by the request's model name (vLLM serves each LoRA under its own name).
Token ids are asked for with vLLM's `"return_token_ids": true` and land in `response_metadata`
under the same keys as the local backend. When a server returns `<tool_call>` text in the content
and no parsed tool_calls (no tool parser configured), selftune's tolerant parser reads it.
"""

from __future__ import annotations

import json
from typing import Any

import openai
from langchain_core.messages import AIMessage
from langchain_core.messages.tool import invalid_tool_call, tool_call
from langchain_core.outputs import ChatResult
from langchain_openai import ChatOpenAI

from agent.backends.local import response_metadata
from agent.config import Config
from agent.parsing import parse_tool_calls


class ChatOpenAICompatible(ChatOpenAI):
    """ChatOpenAI that records token ids, the adapter and the raw completion like ChatLocal."""

    adapter: str | None = None
    # vLLM's extension; set False for a server that rejects unknown request fields
    request_token_ids: bool = True
    seed: int | None = None

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
    )
