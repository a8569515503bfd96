"""Recording what the server answers: every chat completion becomes a trace in the store.

One request is one trace (tag `traffic`, metadata `source = "serve"`) holding one llm span with
the messages and tools the client sent, the completion, its tool calls and, where the engine
has them, the token ids. The trace id is the response's id without its `chatcmpl-` prefix, so
the id a client got back is all that feedback needs. Traces group into sessions by the
`X-Selftune-Session` header, else `metadata.session_id`, the conversation id or `user`.

A request with the `X-Selftune-Private: 1` header (or `metadata.private`) is marked private:
recorded, never trained on. `POST /v1/feedback` with `"private": true` marks a session private
after the fact (every trace of it so far, and its requests still to come).

Implicit signals (a question asked again in the same session, a tool result that is an error)
go into the trace's `metadata.weak_labels`, each with its source `implicit`.

Recording never blocks answering: a store that cannot be written (full disk, locked file)
becomes a logged warning and the answer still goes out.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from traces.schemas import LlmData, Span, ToolCall
from traces.store import TraceStoreError
from traces.tracer import ActiveTrace, Tracer

log = logging.getLogger("selftune.serve")

TRAFFIC_TAG = "traffic"
TRACE_HEADER = "X-Selftune-Trace-Id"
SESSION_HEADER = "X-Selftune-Session"
CONVERSATION_HEADER = "X-Selftune-Conversation"
# a session marked private (this header, or `metadata.private` in the request) is recorded but
# never trained on: `selftune improve --source traffic` and traffic datasets leave it out
PRIVATE_HEADER = "X-Selftune-Private"
RESPONSE_PREFIX = "chatcmpl-"


def response_id(trace_id: str) -> str:
    """The chat completion id for a trace: `chatcmpl-<trace id>`."""
    return f"{RESPONSE_PREFIX}{trace_id}"


def trace_id_of(id_: str) -> str:
    """The trace id in a response id (or the trace id itself)."""
    return id_.removeprefix(RESPONSE_PREFIX)


def _metadata(body: Mapping[str, Any]) -> dict[str, Any]:
    meta = body.get("metadata")
    return meta if isinstance(meta, dict) else {}


def conversation_id(headers: Mapping[str, str], body: Mapping[str, Any]) -> str | None:
    """The conversation a request continues: the `X-Selftune-Conversation` header, else
    `metadata.conversation_id`; None for a stateless request."""
    found = headers.get(CONVERSATION_HEADER.lower()) or _metadata(body).get("conversation_id")
    return str(found) if found else None


def session_info(headers: Mapping[str, str], body: Mapping[str, Any]) -> dict[str, Any]:
    """What the trace's metadata says about who asked: session id, user, client."""
    meta = _metadata(body)
    user = body.get("user") or meta.get("user")
    session = (
        headers.get(SESSION_HEADER.lower())
        or meta.get("session_id")
        or conversation_id(headers, body)
        or user
    )
    info: dict[str, Any] = {"source": "serve"}
    if session:
        info["session_id"] = str(session)
    if user:
        info["user"] = str(user)
    if str(headers.get(PRIVATE_HEADER.lower()) or "").lower() in ("1", "true", "yes"):
        info["private"] = True
    if headers.get("user-agent"):
        info["client"] = headers["user-agent"]
    if meta:
        info["request_metadata"] = {str(k): v for k, v in meta.items()}
    return info


def _last_user_text(messages: list[Any]) -> str | None:
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            content = m.get("content")
            text = content if isinstance(content, str) else json.dumps(content, sort_keys=True)
            return " ".join(text.lower().split())
    return None


class SessionMemory:
    """Implicit signals the protocol shows, kept as weak labels with their source: the user
    asked the same thing again (about the session's previous answer) and a tool result in the
    request is an error (about the call the model made). Remembers each session's last question,
    for the most recent `max_sessions` sessions."""

    def __init__(self, max_sessions: int = 10_000) -> None:
        self.max_sessions = max_sessions
        self._last: OrderedDict[str, tuple[str, str]] = OrderedDict()
        # sessions marked private by `POST /v1/feedback` while this server runs: their later
        # requests are recorded private too (the store holds the mark of the earlier ones)
        self.private: set[str] = set()

    def weak_labels(self, session: str | None, body: Mapping[str, Any], trace_id: str) -> list:
        messages = list(body.get("messages") or [])
        labels: list[dict[str, Any]] = [
            {"signal": "tool_error", "source": "implicit", "tool_call_id": m.get("tool_call_id")}
            for m in messages
            if isinstance(m, dict)
            and m.get("role") == "tool"
            and str(m.get("content") or "").lstrip().lower().startswith("error")
        ]
        question = _last_user_text(messages)
        if session and question:
            before = self._last.get(session)
            if before is not None and before[0] == question:
                labels.append(
                    {"signal": "repeated_question", "source": "implicit", "about": before[1]}
                )
            self._last[session] = (question, trace_id)
            self._last.move_to_end(session)
            while len(self._last) > self.max_sessions:
                self._last.popitem(last=False)
        return labels


def _arguments(raw: Any) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    try:
        parsed = json.loads(raw) if isinstance(raw, str) and raw.strip() else {}
    except json.JSONDecodeError:
        return {"_raw": raw}
    return parsed if isinstance(parsed, dict) else {"_value": parsed}


def sent_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The request's messages as the store keeps them: tool-call arguments as dicts (what
    dataset rows need), everything else as sent."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [
                {
                    **c,
                    "function": {
                        **c["function"],
                        "arguments": _arguments(c["function"].get("arguments")),
                    },
                }
                if isinstance(c, dict) and isinstance(c.get("function"), dict)
                else c
                for c in m["tool_calls"]
            ]
        out.append(m)
    return out


def fill_span(span: Span, response: Mapping[str, Any]) -> str:
    """Copy an OpenAI chat.completion (ours or an upstream's) into the llm span; returns the
    answer text. Token ids come from `prompt_token_ids` and the choice's `token_ids`, which our
    server and vLLM return when asked."""
    llm = span.llm
    assert llm is not None
    choice = (response.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    content = message.get("content") or ""
    calls = message.get("tool_calls") or []
    llm.tool_calls = [
        ToolCall(
            id=c.get("id") or "",
            name=(c.get("function") or {}).get("name") or "",
            arguments=_arguments((c.get("function") or {}).get("arguments")),
            raw_arguments=str((c.get("function") or {}).get("arguments") or ""),
        )
        for c in calls
    ]
    raw = choice.get("raw_completion")
    if raw is None:  # an upstream's answer: write its calls the way our template does
        raw = content + "".join(
            "\n<tool_call>"
            + json.dumps({"name": c.name, "arguments": c.arguments}, ensure_ascii=False)
            + "</tool_call>"
            for c in llm.tool_calls
        )
    llm.completion = raw
    llm.model = response.get("model")
    llm.finish_reason = choice.get("finish_reason")
    usage = response.get("usage") or {}
    llm.input_tokens = usage.get("prompt_tokens")
    llm.output_tokens = usage.get("completion_tokens")
    llm.prompt_token_ids = response.get("prompt_token_ids")
    llm.completion_token_ids = choice.get("token_ids")
    return content


class LenientTracer(Tracer):
    """A Tracer for a server: a write that fails (full disk, locked store) is a logged warning
    when its trace ends, never an exception in the request that is being answered."""

    def _wait_written(self) -> TraceStoreError | None:
        err = super()._wait_written()
        if err is not None:
            log.warning("a trace was not recorded: %s", err)
        return None

    async def _await_written(self) -> TraceStoreError | None:
        err = await super()._await_written()
        if err is not None:
            log.warning("a trace was not recorded: %s", err)
        return None


@asynccontextmanager
async def recorded_call(
    tracer: Tracer,
    trace_id: str,
    body: Mapping[str, Any],
    *,
    model: str,
    adapter: str | None,
    info: dict[str, Any],
    sampling: dict[str, Any] | None = None,
) -> AsyncIterator[tuple[ActiveTrace, Span]]:
    """A trace with one llm span around one answered request; fill the span with `fill_span`.
    A failed store write is logged, never raised (the answer matters more than its record)."""
    llm = LlmData(
        messages=sent_messages(list(body["messages"])),
        tools=list(body.get("tools") or []),
        model=model,
        adapter=adapter,
        sampling=dict(sampling or {}),
    )
    try:
        async with tracer.trace(
            model=model,
            adapter=adapter,
            tags=[TRAFFIC_TAG],
            metadata=info,
            trace_id=trace_id,
        ) as trace:
            with tracer.span("llm", f"chat {model}", llm=llm) as span:
                yield trace, span
    except TraceStoreError as e:
        log.warning("trace %s was not recorded: %s", trace_id, e)
