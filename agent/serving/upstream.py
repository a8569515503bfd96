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
