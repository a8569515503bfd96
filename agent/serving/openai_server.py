"""An OpenAI-compatible HTTP server over a `LocalEngine` (what `selftune serve --engine local` runs).

Routes: `POST /v1/chat/completions` (tools; the model name picks the adapter, `selftune-agent`
the orchestrator agent; vLLM's `return_token_ids`; `stream: true` answers as server-sent
events), `GET /v1/models`, `POST /v1/feedback`, `GET /health`, and vLLM's runtime LoRA routes
`POST /v1/load_lora_adapter` and `POST /v1/unload_lora_adapter`. Concurrent requests share
`generate` batches through the engine's micro-batcher. With `--upstream` the completions come
from another OpenAI-compatible server instead (agent/serving/upstream.py).

Every answer is a trace (agent/serving/recording.py) whose id is the completion's id without
its `chatcmpl-` prefix, also sent as the `X-Selftune-Trace-Id` header and the body's
`trace_id`. The raw model's streams are its finished answers cut into chunks (the engine
generates whole batches); the agent's stream starts at once and sends the answer when the
episode ends.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from agent.agent import RunResult
from agent.config import Config
from agent.model.engine import AdapterError, ContextOverflowError, LocalEngine, Sampling
from agent.model.parsing import parse_tool_calls
from agent.serving.agent_service import AGENT_MODEL, AgentService, agent_turn, finish_reason
from agent.serving.recording import (
    CONVERSATION_HEADER,
    TRACE_HEADER,
    LenientTracer,
    SessionMemory,
    conversation_id,
    fill_span,
    recorded_call,
    response_id,
    session_info,
    trace_id_of,
)
from agent.serving.upstream import StreamAccumulator, Upstream, UpstreamError
from traces.feedback import FeedbackError, give_feedback
from traces.schemas import new_id
from traces.store import TraceNotFoundError, TraceStore, TraceStoreError
from traces.tracer import Tracer

log = logging.getLogger("selftune.serve")


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": kind, "code": status}}, status_code=status
    )


MAX_BODY_BYTES = 4 * 1024 * 1024  # far above any prompt that fits the model's context
MAX_NEW_TOKENS = 4096  # the most tokens one request may ask the model to write


class BodyTooLarge(ValueError):
    pass


async def _body(request: Request) -> dict[str, Any]:
    limit = request.app.state.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"the request body is {declared} bytes; this server takes {limit}")
    raw = bytearray()
    async for chunk in request.stream():  # a body without a length is counted as it comes
        raw += chunk
        if len(raw) > limit:
            raise BodyTooLarge(f"the request body is over {limit} bytes, this server's limit")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"the request body is not JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError("the request body must be a JSON object")
    return data


def _sampling(body: dict[str, Any], cap: int = MAX_NEW_TOKENS) -> Sampling:
    stop = body.get("stop") or ()
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 256
    if int(max_tokens) > cap:
        raise ValueError(f"max_tokens {max_tokens} is above this server's cap of {cap}")
    return Sampling(
        temperature=float(body.get("temperature") if body.get("temperature") is not None else 0.0),
        top_p=float(body.get("top_p") if body.get("top_p") is not None else 1.0),
        max_tokens=int(max_tokens),
        seed=body.get("seed"),
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
    )


def adapter_for(engine: LocalEngine, model: str | None) -> str | None:
    """The adapter a request's model name asks for: None for the base model's name (or none)."""
    if not model or model == engine.name or model == str(engine.path):
        return None
    if model in engine.adapters():
        return model
    raise LookupError(
        f"model {model!r} is not served; available: {[engine.name, *engine.adapters()]}"
    )


def completion_response(
    body: dict[str, Any], completion: Any, model: str, *, id_: str | None = None
) -> dict[str, Any]:
    """The OpenAI chat.completion object for one engine completion (tool calls parsed); token
    ids are included (the caller drops them when the client did not ask)."""
    parsed = parse_tool_calls(completion.text)
    message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
    finish = completion.finish_reason
    if parsed.errors:
        # leave the text as written so the client can show the model what went wrong
        message["content"] = completion.text
    elif parsed.calls:
        message["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {
                    "name": c.name,
                    "arguments": json.dumps(c.arguments, ensure_ascii=False),
                },
            }
            for c in parsed.calls
        ]
        finish = "tool_calls" if finish == "stop" else finish
    choice: dict[str, Any] = {
        "index": 0,
        "message": message,
        "finish_reason": finish,
        "logprobs": None,
        "raw_completion": completion.text,  # selftune extension: the unparsed text
        "token_ids": completion.completion_token_ids,
    }
    return {
        "id": id_ or f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": {
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens,
        },
        "prompt_token_ids": completion.prompt_token_ids,
    }


def _client_view(body: dict[str, Any], out: dict[str, Any], trace_id: str) -> dict[str, Any]:
    """What the client gets: token ids only when it asked (`return_token_ids`), the trace id
    as the selftune extension field `trace_id`."""
    out = dict(out)
    out["trace_id"] = trace_id
    if not body.get("return_token_ids"):
        out.pop("prompt_token_ids", None)
        out["choices"] = [
            {k: v for k, v in c.items() if k != "token_ids"} for c in out.get("choices") or []
        ]
    return out


def _validate(body: dict[str, Any]) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of chat messages")
    if not all(isinstance(m, dict) and m.get("role") for m in messages):
        raise ValueError("'messages': every message must be an object with a 'role'")
    if int(body.get("n") or 1) != 1:
        raise ValueError("'n': only n=1 is supported")


def _info(request: Request, body: dict[str, Any], trace_id: str) -> dict[str, Any]:
    """The trace's metadata: the session, and the weak labels this request shows."""
    info = session_info(request.headers, body)
    if info.get("session_id") in request.app.state.sessions.private:  # marked over feedback
        info["private"] = True
    labels = request.app.state.sessions.weak_labels(info.get("session_id"), body, trace_id)
    if labels:
        info["weak_labels"] = labels
    return info


async def _answer_local(request: Request, body: dict[str, Any], trace_id: str) -> dict[str, Any]:
    state = request.app.state
    engine: LocalEngine = state.engine
    adapter = adapter_for(engine, body.get("model"))
    sampling = _sampling(body, state.max_new_tokens)
    model = body.get("model") or engine.name
    info = _info(request, body, trace_id)
    out: dict[str, Any] = {}
    async with recorded_call(
        state.tracer, trace_id, body, model=model, adapter=adapter, info=info,
        sampling=sampling.as_dict(),
    ) as (trace, span):  # fmt: skip
        completion = await engine.agenerate(
            body["messages"], body.get("tools") or None, adapter=adapter, sampling=sampling
        )
        out = completion_response(body, completion, model, id_=response_id(trace_id))
        trace.finish("ok", answer=fill_span(span, out))
    return out


async def _answer_upstream(request: Request, body: dict[str, Any], trace_id: str) -> dict[str, Any]:
    state = request.app.state
    upstream: Upstream = state.upstream
    _sampling(body, state.max_new_tokens)  # the same bounds as for the local model
    info = _info(request, body, trace_id)
    info["upstream"] = upstream.base_url
    model = body.get("model") or "upstream"
    out: dict[str, Any] = {}
    async with recorded_call(
        state.tracer, trace_id, body, model=model, adapter=None, info=info
    ) as (trace, span):
        out = dict(await upstream.complete(body))
        trace.metadata["upstream_id"] = out.get("id")
        out["id"] = response_id(trace_id)
        trace.finish("ok", answer=fill_span(span, out))
    return out


async def _stream_upstream(request: Request, body: dict[str, Any], trace_id: str) -> Response:
    """Pass the upstream's stream on as it comes (ids rewritten to this trace's) and record
    the answer it amounted to once it ends. A stream the client abandons is not recorded."""
    state = request.app.state
    upstream: Upstream = state.upstream
    _sampling(body, state.max_new_tokens)
    info = _info(request, body, trace_id)
    info["upstream"] = upstream.base_url
    started = time.time()
    response = await upstream.open_stream(body)  # an error status raises before streaming
    wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    acc = StreamAccumulator()

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        try:
            async for line in response.aiter_lines():
                data = line.removeprefix("data:").strip() if line.startswith("data:") else ""
                if not data or data == "[DONE]":
                    continue
                try:
                    chunk = json.loads(data)
                except json.JSONDecodeError:
                    continue
                acc.add(chunk)
                chunk["id"] = response_id(trace_id)
                if "trace_id" in chunk:  # an upstream selftune's own trace id
                    chunk["trace_id"] = trace_id
                if chunk.get("choices") or wants_usage:
                    yield chunk
        finally:
            await response.aclose()
        await _record_streamed(request, body, trace_id, info, acc, started)

    return _stream(chunks(), {TRACE_HEADER: trace_id})


async def _record_streamed(
    request: Request,
    body: dict[str, Any],
    trace_id: str,
    info: dict[str, Any],
    acc: StreamAccumulator,
    started: float,
) -> None:
    out = acc.completion()
    model = body.get("model") or out.get("model") or "upstream"
    async with recorded_call(
        request.app.state.tracer, trace_id, body, model=model, adapter=None, info=info
    ) as (trace, span):
        trace.start = span.start = started
        trace.metadata["upstream_id"] = out.get("id")
        trace.metadata["streamed"] = True
        trace.finish("ok", answer=fill_span(span, out))


def _agent_sampling(body: dict[str, Any], cap: int) -> dict[str, Any]:
    """The sampling settings a request sets for the agent's model calls (the rest: config)."""
    out: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if max_tokens is not None:
        if int(max_tokens) > cap:
            raise ValueError(f"max_tokens {max_tokens} is above this server's cap of {cap}")
        out["max_tokens"] = int(max_tokens)
    for key in ("temperature", "top_p", "seed"):
        if body.get(key) is not None:
            out[key] = body[key]
    return out


def _agent_usage(tracer: Tracer, trace_id: str) -> dict[str, int]:
    """Tokens over every model call of the episode, read back from the store."""
    prompt = completion = 0
    if tracer.store is not None:
        try:
            for s in tracer.store.spans(trace_id):
                if s.llm is not None:
                    prompt += s.llm.input_tokens or 0
                    completion += s.llm.output_tokens or 0
        except TraceStoreError as e:
            log.warning("could not read back trace %s: %s", trace_id, e)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _agent_response(
    result: RunResult, trace_id: str, conversation: str | None, usage: dict[str, int]
) -> dict[str, Any]:
    return {
        "id": response_id(trace_id),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": AGENT_MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.answer or ""},
                "finish_reason": finish_reason(result),
                "logprobs": None,
            }
        ],
        "usage": usage,
        # selftune extensions
        "trace_id": trace_id,
        "conversation_id": conversation,
        "status": result.status,
        "steps": result.steps,
        "adapter": result.adapter,
    }


def _agent_failure(result: RunResult, trace_id: str) -> JSONResponse:
    status = 504 if result.status == "timeout" else 500
    return JSONResponse(
        {
            "error": {
                "message": f"the agent stopped with status {result.status}: {result.error}",
                "type": "agent_error",
                "code": status,
                "trace_id": trace_id,
            }
        },
        status_code=status,
        headers={TRACE_HEADER: trace_id},
    )


def _chunk(id_: str, model: str, delta: dict[str, Any], finish: str | None = None) -> dict:
    return {
        "id": id_,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


_PIECES = re.compile(r"\s*\S+\s*|\s+")


def completion_chunks(out: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
    """A finished chat.completion as the chunks a stream of it would have sent: the role, the
    content in word-sized pieces, each tool call, the finish reason, and the usage if asked."""
    id_, model = out["id"], out["model"]
    choice = out["choices"][0]
    message = choice["message"]
    chunks = [_chunk(id_, model, {"role": "assistant", "content": ""})]
    chunks += [
        _chunk(id_, model, {"content": p}) for p in _PIECES.findall(message.get("content") or "")
    ]
    for i, call in enumerate(message.get("tool_calls") or []):
        chunks.append(_chunk(id_, model, {"tool_calls": [{"index": i, **call}]}))
    chunks.append(_chunk(id_, model, {}, choice.get("finish_reason") or "stop"))
    for key in ("trace_id", "conversation_id"):
        if out.get(key):
            chunks[-1][key] = out[key]
    if include_usage:
        chunks.append({**_chunk(id_, model, {}), "choices": [], "usage": out.get("usage")})
    return chunks


def _stream(chunks: AsyncIterator[dict[str, Any]], headers: dict[str, str]) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        async for c in chunks:
            yield _sse(c)
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers}
    )


async def _each(items: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    for item in items:
        yield item


async def _agent_chat(request: Request, body: dict[str, Any]) -> Response:
    state = request.app.state
    service: AgentService = state.agent
    conversation = conversation_id(request.headers, body)
    turn = agent_turn(body, conversation)
    sampling = _agent_sampling(body, state.max_new_tokens)
    trace_id = new_id()
    info = _info(request, body, trace_id)
    headers = {TRACE_HEADER: trace_id}
    if conversation:
        headers[CONVERSATION_HEADER] = conversation

    async def run() -> RunResult:
        return await service.run(turn, trace_id=trace_id, metadata=info, sampling=sampling)

    if not body.get("stream"):
        result = await run()
        if result.status in ("error", "timeout"):
            return _agent_failure(result, trace_id)
        usage = await asyncio.to_thread(_agent_usage, state.tracer, trace_id)
        return JSONResponse(_agent_response(result, trace_id, conversation, usage), headers=headers)

    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        id_ = response_id(trace_id)
        # the role goes out at once: a client sees the stream start while the episode runs
        yield _chunk(id_, AGENT_MODEL, {"role": "assistant", "content": ""})
        result = await run()
        if result.status in ("error", "timeout"):
            yield {
                "error": {
                    "message": f"the agent stopped with status {result.status}: {result.error}",
                    "type": "agent_error",
                    "trace_id": trace_id,
                }
            }
            return
        usage = await asyncio.to_thread(_agent_usage, state.tracer, trace_id)
        out = _agent_response(result, trace_id, conversation, usage)
        for c in completion_chunks(out, include_usage)[1:]:
            yield c

    return _stream(chunks(), headers)


async def chat(request: Request) -> Response:
    state = request.app.state
    try:
        body = await _body(request)
        _validate(body)
        if state.agent is not None and body.get("model") == AGENT_MODEL:
            return await _agent_chat(request, body)
        trace_id = new_id()
        if state.upstream is not None and body.get("stream"):
            return await _stream_upstream(request, body, trace_id)
        if state.upstream is not None:
            out = await _answer_upstream(request, body, trace_id)
        else:
            out = await _answer_local(request, body, trace_id)
    except BodyTooLarge as e:
        return _error(413, str(e))
    except UpstreamError as e:
        if isinstance(e.body, dict) and "error" in e.body:
            return JSONResponse(e.body, status_code=e.status)
        return _error(e.status, str(e), "upstream_error")
    except LookupError as e:
        return _error(404, str(e), "model_not_found")
    except (ValueError, TypeError, AdapterError, ContextOverflowError) as e:
        return _error(400, str(e))
    out = _client_view(body, out, trace_id)
    headers = {TRACE_HEADER: trace_id}
    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return _stream(_each(completion_chunks(out, include_usage)), headers)
    return JSONResponse(out, headers=headers)


class FeedbackBody(BaseModel):
    """`POST /v1/feedback`: a person's verdict on one answer."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)  # the completion's id (chatcmpl-...) or the trace id
    thumb: Literal["up", "down"] | None = None
    score: float | None = Field(default=None, ge=0.0, le=1.0)
    note: str | None = None
    correction: str | None = None
    user: str | None = None  # who gives it (default: the X-Selftune-User header)
    # true: the answer's whole session stays out of training from now on (only true is taken:
    # once people were told a session is private, nothing over HTTP undoes that)
    private: Literal[True] | None = None


def _field_errors(e: ValidationError) -> str:
    return "; ".join(
        f"'{'.'.join(str(p) for p in err['loc']) or 'body'}': {err['msg']}" for err in e.errors()
    )


async def feedback(request: Request) -> Response:
    state = request.app.state
    if state.store is None:
        return _error(503, "this server has no trace store to put feedback in", "unavailable")
    try:
        fb = FeedbackBody.model_validate(await _body(request))
        verdict = fb.thumb is not None or fb.score is not None or fb.correction is not None
        if not verdict and not fb.private:
            return _error(
                422, "give 'thumb' (up or down), 'score' (0 to 1), 'correction' or 'private': true"
            )
        who = fb.user or request.headers.get("x-selftune-user") or "anonymous"
        given = await asyncio.to_thread(
            give_feedback,
            state.store,
            trace_id_of(fb.id),
            None if fb.thumb is None else fb.thumb == "up",
            score=fb.score,
            note=fb.note,
            correction=fb.correction,
            private=bool(fb.private),
            who=who,
            via="http",
        )
        if fb.private:
            state.sessions.private.add(given.session)  # and the session's requests still to come
    except BodyTooLarge as e:
        return _error(413, str(e))
    except ValidationError as e:
        return _error(422, _field_errors(e))
    except TraceNotFoundError as e:
        return _error(
            404, f"{e}: use the 'id' a chat completion of this server returned", "not_found"
        )
    except (FeedbackError, ValueError) as e:
        return _error(422 if isinstance(e, FeedbackError) else 400, str(e))
    out: dict[str, Any] = {"object": "feedback", "trace_id": given.trace_id}
    if (grade := given.grade) is not None:
        out.update(id=grade.id, value=grade.value, grader=grade.grader)
    if fb.private:
        out.update(private=True, marked_traces=len(given.marked))
    return JSONResponse(out)


async def models(request: Request) -> Response:
    state = request.app.state
    created = int(time.time())
    entries: list[tuple[str, str | None, str | None]] = []
    if state.engine is not None:
        engine: LocalEngine = state.engine
        entries.append((engine.name, str(engine.path), None))
        entries += [(name, path, engine.name) for name, path in engine.adapters().items()]
    if state.agent is not None:
        entries.append((AGENT_MODEL, None, None))
    data = [
        {
            "id": i,
            "object": "model",
            "created": created,
            "owned_by": "selftune",
            "root": root,
            "parent": parent,
        }
        for i, root, parent in entries
    ]
    if state.upstream is not None:
        try:
            data += await state.upstream.models()
        except UpstreamError as e:
            return _error(502, str(e), "upstream_error")
    return JSONResponse({"object": "list", "data": data})


async def health(request: Request) -> Response:
    return PlainTextResponse("")


def _no_engine() -> JSONResponse:
    return _error(400, "this server forwards to an upstream (--upstream): it has no local model")


async def load_lora(request: Request) -> Response:
    engine: LocalEngine = request.app.state.engine
    if engine is None:
        return _no_engine()
    try:
        body = await _body(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            return _error(400, "both 'lora_name' and 'lora_path' are required")
        # loading takes ~0.5 s: keep the event loop answering meanwhile
        await asyncio.to_thread(
            engine.load_adapter, name, path, replace=bool(body.get("load_inplace"))
        )
    except BodyTooLarge as e:
        return _error(413, str(e))
    except (ValueError, AdapterError) as e:
        return _error(400, str(e))
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


async def unload_lora(request: Request) -> Response:
    engine: LocalEngine = request.app.state.engine
    if engine is None:
        return _no_engine()
    try:
        body = await _body(request)
        name = body.get("lora_name")
        if not name:
            return _error(400, "'lora_name' is required")
        engine.unload_adapter(name)
    except AdapterError as e:
        return _error(404, str(e), "not_found")
    except ValueError as e:
        return _error(400, str(e))
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


class _RequireKey:
    """ASGI middleware: every route but /health needs `Authorization: Bearer <key>`."""

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.key = app, key

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            headers = dict(scope.get("headers") or [])
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given, f"Bearer {self.key}"):
                response = _error(
                    401, "missing or wrong API key: send 'Authorization: Bearer <key>'"
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(
    engine: LocalEngine | None = None,
    *,
    agent: AgentService | None = None,
    upstream: Upstream | None = None,
    tracer: Tracer | None = None,
    store: TraceStore | None = None,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> Starlette:
    """The Starlette app serving `engine` (or forwarding to `upstream`) and, when given, the
    `agent` as the model `selftune-agent`. Each answer is recorded through `tracer` (none: not
    recorded); `POST /v1/feedback` writes to `store`. Bodies over `max_body_bytes` get 413,
    requests for more than `max_new_tokens` tokens get 400; with `api_key`, requests without
    it get 401."""
    if engine is None and upstream is None:
        raise ValueError("build_app needs an engine or an upstream")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        if agent is not None:
            await agent.aclose()
        if upstream is not None:
            await upstream.aclose()

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/feedback", feedback, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/v1/load_lora_adapter", load_lora, methods=["POST"]),
            Route("/v1/unload_lora_adapter", unload_lora, methods=["POST"]),
        ],
        middleware=[Middleware(_RequireKey, key=api_key)] if api_key else [],
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.agent = agent
    app.state.upstream = upstream
    app.state.tracer = tracer or Tracer.disabled()
    app.state.store = store
    app.state.sessions = SessionMemory()
    app.state.max_body_bytes = max_body_bytes
    app.state.max_new_tokens = max_new_tokens
    return app


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_server(
    cfg: Config,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    adapters: list[str] | None = None,
    record: bool = True,
    serve_agent: bool = True,
    upstream: str | None = None,
    upstream_key: str | None = None,
    api_key: str | None = None,
) -> None:
    """`selftune serve`: load the configured model (and `NAME=FOLDER` adapters), or forward to
    `upstream`, serve it with the agent as `selftune-agent`, and record every answer in the
    workspace's trace store unless `record` is off."""
    import uvicorn

    from agent.agent import Agent
    from agent.workspace import open_store, open_tracer

    if not _loopback(host) and not api_key:
        raise ValueError(
            f"--host {host} is reachable from other machines: give --api-key "
            "(or SELFTUNE_API_KEY) so that only clients with the key are answered"
        )
    tracer: Tracer = Tracer.disabled()
    if record:  # the workspace's store and OTLP export, as `open_tracer` sets them up
        configured = open_tracer(cfg)
        tracer = LenientTracer(configured.store, configured.sinks)
    eng = None
    remote = None
    if upstream:
        remote = Upstream(upstream, api_key=upstream_key)
    else:
        eng = LocalEngine.from_config(cfg)
        for spec in adapters or []:
            name, sep, folder = spec.partition("=")
            if not sep or not name or not folder:
                raise ValueError(f"--adapter {spec!r} must be NAME=FOLDER")
            eng.load_adapter(name, folder)
    service = None
    if serve_agent and eng is not None:
        service = AgentService(Agent(cfg, engine=eng, tracer=tracer))
    app = build_app(
        eng, agent=service, upstream=remote, tracer=tracer, store=open_store(cfg), api_key=api_key
    )
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        tracer.close()
