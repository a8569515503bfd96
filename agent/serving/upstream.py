"""Proxy mode (`selftune serve --upstream URL`): chat completions go to another
OpenAI-compatible server (the production model, a stronger teacher, vLLM, another selftune)
and what it answers is recorded here, so a small local model can learn to replace it."""

from __future__ import annotations

from typing import Any

import httpx

from tools.errors import SelftuneError


class UpstreamError(SelftuneError, RuntimeError):
    """The upstream server could not be reached or did not answer with a completion."""

    def __init__(self, message: str, status: int = 502, body: Any = None):
        super().__init__(message)
        self.status = status
        self.body = body


class Upstream:
    """An OpenAI-compatible server at `base_url` (ending in /v1), reached with httpx."""

    def __init__(
        self, base_url: str, *, api_key: str | None = None, timeout_s: float = 600.0
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"--upstream {base_url!r} must be an http(s) URL such as http://host:8000/v1"
            )
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout_s)

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """The upstream's chat.completion for `body`, asked without streaming (the server
        streams the finished answer to clients that asked for a stream)."""
        sent = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        try:
            r = await self.client.post("/chat/completions", json=sent)
        except httpx.HTTPError as e:
            raise UpstreamError(f"upstream {self.base_url} unreachable: {e!r}") from None
        try:
            data = r.json()
        except ValueError:
            data = None
        if r.status_code >= 400:
            # pass the upstream's own error on: its status and body say what was wrong
            raise UpstreamError(
                f"upstream {self.base_url} answered {r.status_code}", r.status_code, data
            )
        if not isinstance(data, dict) or not data.get("choices"):
            raise UpstreamError(
                f"upstream {self.base_url} answered without choices: {r.text[:200]}"
            )
        return data

    async def open_stream(self, body: dict[str, Any]) -> httpx.Response:
        """The upstream's streamed answer to `body`, its status checked, its body not yet read
        (iterate `aiter_lines`, then `aclose`). Usage is always asked for, to be recorded."""
        sent = {**body, "stream": True, "stream_options": {"include_usage": True}}
        request = self.client.build_request("POST", "/chat/completions", json=sent)
        try:
            r = await self.client.send(request, stream=True)
        except httpx.HTTPError as e:
            raise UpstreamError(f"upstream {self.base_url} unreachable: {e!r}") from None
        if r.status_code >= 400:
            await r.aread()
            await r.aclose()
            try:
                data = r.json()
            except ValueError:
                data = None
            raise UpstreamError(
                f"upstream {self.base_url} answered {r.status_code}", r.status_code, data
            )
        return r

    async def models(self) -> list[dict[str, Any]]:
        try:
            r = await self.client.get("/models")
            r.raise_for_status()
            return list(r.json().get("data") or [])
        except (httpx.HTTPError, ValueError, AttributeError) as e:
            raise UpstreamError(
                f"upstream {self.base_url} did not list its models: {e!r}"
            ) from None

    async def aclose(self) -> None:
        await self.client.aclose()


class StreamAccumulator:
    """The chat.completion that a stream of chunks amounts to: content joined, tool calls
    assembled by index, the finish reason and the usage."""

    def __init__(self) -> None:
        self.id: str | None = None
        self.model: str | None = None
        self.content: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.finish: str | None = None
        self.usage: dict[str, Any] | None = None

    def add(self, chunk: dict[str, Any]) -> None:
        self.id = self.id or chunk.get("id")
        self.model = self.model or chunk.get("model")
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self.content.append(delta["content"])
            for c in delta.get("tool_calls") or []:
                call = self.calls.setdefault(
                    int(c.get("index") or 0),
                    {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
                )
                call["id"] = c.get("id") or call["id"]
                fn = c.get("function") or {}
                call["function"]["name"] += fn.get("name") or ""
                call["function"]["arguments"] += fn.get("arguments") or ""
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]

    def completion(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content)}
        if self.calls:
            message["tool_calls"] = [self.calls[i] for i in sorted(self.calls)]
        return {
            "id": self.id,
            "object": "chat.completion",
            "model": self.model,
            "choices": [{"index": 0, "message": message, "finish_reason": self.finish}],
            "usage": self.usage or {},
        }
