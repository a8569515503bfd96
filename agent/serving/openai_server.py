"""An OpenAI-compatible HTTP server over a `LocalEngine` (what `selftune serve --engine local` runs).

Routes: `POST /v1/chat/completions` (non-streaming; tools; the model name picks the adapter;
vLLM's `return_token_ids`), `GET /v1/models`, `GET /health`, and vLLM's runtime LoRA routes
`POST /v1/load_lora_adapter` and `POST /v1/unload_lora_adapter`. Concurrent requests share
`generate` batches through the engine's micro-batcher.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from agent.config import Config
from agent.model.engine import AdapterError, ContextOverflowError, LocalEngine, Sampling
from agent.model.parsing import parse_tool_calls


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


def completion_response(body: dict[str, Any], completion: Any, model: str) -> dict[str, Any]:
    """The OpenAI chat.completion object for one engine completion (tool calls parsed)."""
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
    }
    out: dict[str, Any] = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": {
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens,
        },
    }
    if body.get("return_token_ids"):
        out["prompt_token_ids"] = completion.prompt_token_ids
        choice["token_ids"] = completion.completion_token_ids
    return out


async def chat(request: Request) -> Response:
    engine: LocalEngine = request.app.state.engine
    try:
        body = await _body(request)
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return _error(400, "'messages' must be a non-empty list of chat messages")
        if body.get("stream"):
            return _error(400, "streaming is not supported by this server: set stream=false")
        if int(body.get("n") or 1) != 1:
            return _error(400, "only n=1 is supported")
        adapter = adapter_for(engine, body.get("model"))
        sampling = _sampling(body, request.app.state.max_new_tokens)
        completion = await engine.agenerate(
            body["messages"], body.get("tools") or None, adapter=adapter, sampling=sampling
        )
    except BodyTooLarge as e:
        return _error(413, str(e))
    except LookupError as e:
        return _error(404, str(e), "model_not_found")
    except (ValueError, TypeError, AdapterError, ContextOverflowError) as e:
        return _error(400, str(e))
    return JSONResponse(completion_response(body, completion, body.get("model") or engine.name))


async def models(request: Request) -> Response:
    engine: LocalEngine = request.app.state.engine
    created = int(time.time())
    entries = [(engine.name, str(engine.path), None)]
    entries += [(name, path, engine.name) for name, path in engine.adapters().items()]
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
    return JSONResponse({"object": "list", "data": data})


async def health(request: Request) -> Response:
    return PlainTextResponse("")


async def load_lora(request: Request) -> Response:
    engine: LocalEngine = request.app.state.engine
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


def build_app(
    engine: LocalEngine,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> Starlette:
    """The Starlette app serving `engine`; bodies over `max_body_bytes` get 413, requests for
    more than `max_new_tokens` tokens get 400."""
    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/v1/load_lora_adapter", load_lora, methods=["POST"]),
            Route("/v1/unload_lora_adapter", unload_lora, methods=["POST"]),
        ]
    )
    app.state.engine = engine
    app.state.max_body_bytes = max_body_bytes
    app.state.max_new_tokens = max_new_tokens
    return app


def serve(engine: LocalEngine, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve `engine` until interrupted."""
    import uvicorn

    uvicorn.run(build_app(engine), host=host, port=port, log_level="info")


def run_server(
    cfg: Config,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    adapters: list[str] | None = None,
) -> None:
    """Load the configured model (and `NAME=FOLDER` adapters) and serve it: `selftune serve`."""
    eng = LocalEngine.from_config(cfg)
    for spec in adapters or []:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--adapter {spec!r} must be NAME=FOLDER")
        eng.load_adapter(name, folder)
    serve(eng, host, port)
