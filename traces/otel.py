"""OpenTelemetry export following the GenAI semantic conventions.

Each trace becomes one OTel trace: a root span `invoke_agent <env>` for the episode, and one
span per stored span, named and attributed as the conventions say:

| our kind          | gen_ai.operation.name | span name                | OTel kind |
|-------------------|-----------------------|--------------------------|-----------|
| llm               | chat                  | `chat <model>`           | CLIENT    |
| tool              | execute_tool          | `execute_tool <tool>`    | INTERNAL  |
| retrieval         | retrieval             | `retrieval <collection>` | CLIENT    |
| agent, subagent   | invoke_agent          | `invoke_agent <name>`    | INTERNAL  |

Message content (`gen_ai.input.messages`, `gen_ai.output.messages`, `gen_ai.tool.call.arguments`,
`gen_ai.tool.call.result`, ...) is included only with `capture_content`, and scrubbed.

Ids: our trace id (32 hex) is the OTel trace id; a span id is the first 16 hex of ours; other
ids are hashed, so the mapping is deterministic. `export_otlp_json` writes an OTLP/JSON file;
`OtlpSink` sends spans live over OTLP/HTTP protobuf from a bounded background queue.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from traces.schemas import Span, Trace, TracesConfig
from traces.scrub import scrub_text

log = logging.getLogger("selftune.traces.otel")

PROVIDER = "selftune.local"
SCOPE_NAME = "selftune.traces"
SERVICE_NAME = "selftune"
KIND_INTERNAL, KIND_CLIENT = 1, 3  # OTLP SpanKind values
STATUS_UNSET, STATUS_OK, STATUS_ERROR = 0, 1, 2
_OPERATION = {
    "llm": "chat",
    "tool": "execute_tool",
    "retrieval": "retrieval",
    "agent": "invoke_agent",
    "subagent": "invoke_agent",
}
_HEX32 = re.compile(r"[0-9a-f]{32}")


def otel_trace_id(trace_id: str) -> str:
    """Our trace id as an OTel trace id (32 lowercase hex)."""
    t = trace_id.lower()
    if _HEX32.fullmatch(t) and t != "0" * 32:
        return t
    return hashlib.sha256(trace_id.encode()).hexdigest()[:32]


def otel_span_id(span_id: str) -> str:
    """Our span id as an OTel span id (16 lowercase hex): its first 16 hex digits."""
    s = span_id.lower()
    if _HEX32.fullmatch(s) and s[:16] != "0" * 16:
        return s[:16]
    return hashlib.sha256(span_id.encode()).hexdigest()[:16]


def root_span_id(trace_id: str) -> str:
    """The OTel id of the episode's root span (derived from the trace id)."""
    return hashlib.sha256(f"{trace_id}:root".encode()).hexdigest()[:16]


@dataclass
class OtelSpan:
    """One span as OTel sees it; rendered to OTLP/JSON or to an SDK ReadableSpan."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str | None
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)
    status_code: int = STATUS_UNSET
    status_message: str = ""


def _ns(t: float) -> int:
    return int(t * 1_000_000_000)


def _json(v: Any, patterns: Sequence[str]) -> str:
    return scrub_text(json.dumps(v, ensure_ascii=False, default=str), patterns)


def _output_messages(span: Span) -> list[dict[str, Any]]:
    llm = span.llm
    assert llm is not None
    parts: list[dict[str, Any]] = []
    if llm.completion:
        parts.append({"type": "text", "content": llm.completion})
    for c in llm.tool_calls:
        parts.append({"type": "tool_call", "id": c.id, "name": c.name, "arguments": c.arguments})
    msg: dict[str, Any] = {"role": "assistant", "parts": parts}
    if llm.finish_reason:
        msg["finish_reason"] = llm.finish_reason
    return [msg]


def span_attributes(
    span: Span, trace: Trace, capture_content: bool = True, extra_patterns: Sequence[str] = ()
) -> dict[str, Any]:
    """The GenAI semantic-convention attributes of one span."""
    op = _OPERATION[span.kind]
    a: dict[str, Any] = {
        "gen_ai.operation.name": op,
        "gen_ai.conversation.id": trace.id,
        "gen_ai.provider.name": str(span.attributes.get("provider") or PROVIDER),
        "selftune.span.kind": span.kind,
    }
    if trace.env:
        a["selftune.env"] = trace.env
    if span.error:
        a["error.type"] = span.error.split(":", 1)[0]
    if span.llm is not None:
        llm = span.llm
        model = llm.model or trace.model
        if model:
            a["gen_ai.request.model"] = model
        if llm.adapter or trace.adapter:
            a["selftune.adapter"] = llm.adapter or trace.adapter
        if llm.input_tokens is not None:
            a["gen_ai.usage.input_tokens"] = llm.input_tokens
        if llm.output_tokens is not None:
            a["gen_ai.usage.output_tokens"] = llm.output_tokens
        if llm.finish_reason:
            a["gen_ai.response.finish_reasons"] = [llm.finish_reason]
        for key, attr in (
            ("temperature", "gen_ai.request.temperature"),
            ("top_p", "gen_ai.request.top_p"),
            ("max_new_tokens", "gen_ai.request.max_tokens"),
            ("max_tokens", "gen_ai.request.max_tokens"),
        ):
            if isinstance(llm.sampling.get(key), int | float):
                a[attr] = llm.sampling[key]
        if capture_content:
            a["gen_ai.input.messages"] = _json(llm.messages, extra_patterns)
            a["gen_ai.output.messages"] = _json(_output_messages(span), extra_patterns)
            if llm.tools:
                a["gen_ai.tool.definitions"] = _json(llm.tools, extra_patterns)
    if span.tool is not None:
        tool = span.tool
        a["gen_ai.tool.name"] = tool.name
        a["gen_ai.tool.type"] = "extension" if tool.server else "function"
        if tool.call_id:
            a["gen_ai.tool.call.id"] = tool.call_id
        if tool.server:
            a["selftune.mcp.server"] = tool.server
        if capture_content:
            a["gen_ai.tool.call.arguments"] = _json(tool.arguments, extra_patterns)
            if tool.result is not None:
                a["gen_ai.tool.call.result"] = scrub_text(tool.result, extra_patterns)
    if span.retrieval is not None:
        r = span.retrieval
        a["gen_ai.data_source.id"] = r.collection
        a["selftune.retrieval.ids"] = list(r.ids)
        a["selftune.retrieval.scores"] = [float(x) for x in r.scores]
        if capture_content:
            a["selftune.retrieval.query"] = scrub_text(r.query, extra_patterns)
            a["selftune.retrieval.texts"] = [scrub_text(x, extra_patterns) for x in r.texts]
    if span.kind in ("agent", "subagent"):
        a["gen_ai.agent.name"] = span.name
    for k, v in span.attributes.items():  # user attributes, namespaced
        if k != "provider":
            a[f"selftune.attr.{k}"] = (
                v if isinstance(v, str | int | float | bool) else _json(v, extra_patterns)
            )
    return a


def _span_name(span: Span, trace: Trace) -> str:
    op = _OPERATION[span.kind]
    if span.llm is not None:
        return f"{op} {span.llm.model or trace.model or span.name}"
    if span.tool is not None:
        return f"{op} {span.tool.name}"
    if span.retrieval is not None:
        return f"{op} {span.retrieval.collection}"
    return f"{op} {span.name}"


def to_otel_span(
    span: Span, trace: Trace, capture_content: bool = True, extra_patterns: Sequence[str] = ()
) -> OtelSpan:
    """One of our spans as an OTel span (its parent is the episode root for top-level spans)."""
    end = span.end if span.end is not None else (trace.end or span.start)
    status = {"ok": STATUS_OK, "error": STATUS_ERROR}.get(span.status, STATUS_UNSET)
    return OtelSpan(
        name=_span_name(span, trace),
        trace_id=otel_trace_id(trace.id),
        span_id=otel_span_id(span.id),
        parent_id=otel_span_id(span.parent_id) if span.parent_id else root_span_id(trace.id),
        kind=KIND_CLIENT if span.kind in ("llm", "retrieval") else KIND_INTERNAL,
        start_ns=_ns(span.start),
        end_ns=_ns(end),
        attributes=span_attributes(span, trace, capture_content, extra_patterns),
        status_code=status,
        status_message=scrub_text(span.error or "", extra_patterns) if span.error else "",
    )


def root_otel_span(
    trace: Trace, capture_content: bool = True, extra_patterns: Sequence[str] = ()
) -> OtelSpan:
    """The episode itself as the root `invoke_agent` span."""
    agent = trace.env or "selftune"
    a: dict[str, Any] = {
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.agent.name": agent,
        "gen_ai.conversation.id": trace.id,
        "gen_ai.provider.name": PROVIDER,
        "selftune.status": trace.status,
    }
    for key, val in (
        ("gen_ai.request.model", trace.model),
        ("selftune.env", trace.env),
        ("selftune.task_id", trace.task_id),
        ("selftune.adapter", trace.adapter),
    ):
        if val:
            a[key] = val
    if trace.tags:
        a["selftune.tags"] = list(trace.tags)
    if trace.error:
        a["error.type"] = trace.error.split(":", 1)[0]
    if capture_content and trace.answer is not None:
        a["gen_ai.output.messages"] = _json(
            [{"role": "assistant", "parts": [{"type": "text", "content": trace.answer}]}],
            extra_patterns,
        )
    status = (
        STATUS_OK
        if trace.status == "ok"
        else STATUS_UNSET
        if trace.status == "running"
        else STATUS_ERROR
    )
    return OtelSpan(
        name=f"invoke_agent {agent}",
        trace_id=otel_trace_id(trace.id),
        span_id=root_span_id(trace.id),
        parent_id=None,
        kind=KIND_INTERNAL,
        start_ns=_ns(trace.start),
        end_ns=_ns(trace.end if trace.end is not None else trace.start),
        attributes=a,
        status_code=status,
        status_message=(trace.error or trace.status) if status == STATUS_ERROR else "",
    )


def trace_to_otel(
    trace: Trace, capture_content: bool = True, extra_patterns: Sequence[str] = ()
) -> list[OtelSpan]:
    """The root span and every span of `trace` (read with its spans)."""
    return [root_otel_span(trace, capture_content, extra_patterns)] + [
        to_otel_span(s, trace, capture_content, extra_patterns) for s in trace.spans
    ]


# --- OTLP/JSON -------------------------------------------------------------------------------


def _any_value(v: Any) -> dict[str, Any]:
    if isinstance(v, bool):
        return {"boolValue": v}
    if isinstance(v, int):
        return {"intValue": str(v)}  # int64 is a string in the OTLP/JSON mapping
    if isinstance(v, float):
        return {"doubleValue": v}
    if isinstance(v, list | tuple):
        return {"arrayValue": {"values": [_any_value(x) for x in v]}}
    return {"stringValue": str(v)}


def _kv(attrs: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"key": k, "value": _any_value(v)} for k, v in attrs.items()]


def otlp_json_span(s: OtelSpan) -> dict[str, Any]:
    d: dict[str, Any] = {
        "traceId": s.trace_id,
        "spanId": s.span_id,
        "name": s.name,
        "kind": s.kind,
        "startTimeUnixNano": str(s.start_ns),
        "endTimeUnixNano": str(s.end_ns),
        "attributes": _kv(s.attributes),
        "status": {"code": s.status_code},
    }
    if s.parent_id:
        d["parentSpanId"] = s.parent_id
    if s.status_message:
        d["status"]["message"] = s.status_message
    return d


def otlp_json(
    traces: Iterable[Trace], capture_content: bool = True, extra_patterns: Sequence[str] = ()
) -> dict[str, Any]:
    """An ExportTraceServiceRequest in the OTLP/JSON mapping (hex ids, nanosecond strings)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("selftune")
    except PackageNotFoundError:
        ours = "0"
    spans = [
        otlp_json_span(s) for t in traces for s in trace_to_otel(t, capture_content, extra_patterns)
    ]
    return {
        "resourceSpans": [
            {
                "resource": {"attributes": _kv({"service.name": SERVICE_NAME})},
                "scopeSpans": [{"scope": {"name": SCOPE_NAME, "version": ours}, "spans": spans}],
            }
        ]
    }


def export_otlp_json(
    traces: Iterable[Trace],
    path: str | Path,
    capture_content: bool = True,
    extra_patterns: Sequence[str] = (),
) -> int:
    """Write `traces` (read with their spans) to `path` as one OTLP/JSON document (scrubbed).
    Returns the number of OTel spans written (root spans included)."""
    doc = otlp_json(traces, capture_content, extra_patterns)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    return len(doc["resourceSpans"][0]["scopeSpans"][0]["spans"])


# --- live OTLP/HTTP export -------------------------------------------------------------------


def _readable(s: OtelSpan, resource: Any, scope: Any) -> Any:
    from opentelemetry import trace as api
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace.status import Status, StatusCode

    def ctx(span_id: str) -> Any:
        return api.SpanContext(
            trace_id=int(s.trace_id, 16),
            span_id=int(span_id, 16),
            is_remote=False,
            trace_flags=api.TraceFlags(api.TraceFlags.SAMPLED),
        )

    code = {STATUS_OK: StatusCode.OK, STATUS_ERROR: StatusCode.ERROR}.get(
        s.status_code, StatusCode.UNSET
    )
    return ReadableSpan(
        name=s.name,
        context=ctx(s.span_id),
        parent=ctx(s.parent_id) if s.parent_id else None,
        resource=resource,
        attributes=s.attributes,
        kind=api.SpanKind.CLIENT if s.kind == KIND_CLIENT else api.SpanKind.INTERNAL,
        status=Status(code, s.status_message or None) if code == StatusCode.ERROR else Status(code),
        start_time=s.start_ns,
        end_time=s.end_ns,
        instrumentation_scope=scope,
    )


def _traces_url(endpoint: str, from_env: bool) -> str:
    """OTEL_EXPORTER_OTLP_ENDPOINT is a base URL (the OTel spec appends /v1/traces); a
    configured URL is used as given unless it has no path."""
    from urllib.parse import urlparse

    endpoint = endpoint.rstrip("/")
    if endpoint.endswith("/v1/traces"):
        return endpoint
    if from_env or not urlparse(endpoint).path:
        return endpoint + "/v1/traces"
    return endpoint


class OtlpSink:
    """Sends spans to an OTLP/HTTP (protobuf) endpoint as the tracer writes them.

    A Tracer sink: `on_write` runs on the tracer's writer thread and only hands spans to
    opentelemetry-sdk's BatchSpanProcessor, whose own thread posts them. Its queue is bounded
    (`max_queue` spans; beyond that they are dropped with a logged warning) and each post times
    out after `timeout_s`, so a slow or dead collector never slows or breaks an episode.
    """

    def __init__(
        self,
        endpoint: str,
        headers: dict[str, str] | None = None,
        capture_content: bool = True,
        extra_patterns: Sequence[str] = (),
        max_queue: int = 4096,
        timeout_s: float = 5.0,
        schedule_delay_ms: int = 500,
    ):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        self.endpoint = endpoint
        self.capture_content = capture_content
        self.extra_patterns = tuple(extra_patterns)
        self._resource = Resource.create({"service.name": SERVICE_NAME})
        self._scope = InstrumentationScope(SCOPE_NAME)
        self._traces: dict[str, Trace] = {}
        self._processor = BatchSpanProcessor(
            OTLPSpanExporter(endpoint=endpoint, headers=dict(headers or {}), timeout=timeout_s),
            max_queue_size=max_queue,
            schedule_delay_millis=schedule_delay_ms,
            max_export_batch_size=min(512, max_queue),
            export_timeout_millis=timeout_s * 1000,
        )

    def _emit(self, s: OtelSpan) -> None:
        self._processor.on_end(_readable(s, self._resource, self._scope))

    def on_write(self, traces: Sequence[Trace], spans: Sequence[Span]) -> None:
        for t in traces:
            self._traces[t.id] = t
        for s in spans:
            t = self._traces.get(s.trace_id) or Trace(id=s.trace_id)
            self._emit(to_otel_span(s, t, self.capture_content, self.extra_patterns))
        for t in traces:
            if t.status != "running":
                self._emit(root_otel_span(t, self.capture_content, self.extra_patterns))
                self._traces.pop(t.id, None)

    def force_flush(self, timeout_s: float = 10.0) -> bool:
        """Post what is queued now; False if it did not finish in time."""
        return self._processor.force_flush(int(timeout_s * 1000))

    def shutdown(self) -> None:
        self._processor.shutdown()


def otlp_sink_from_config(cfg: TracesConfig) -> OtlpSink | None:
    """An OtlpSink for `[traces] otlp_endpoint` (else OTEL_EXPORTER_OTLP_ENDPOINT), or None."""
    endpoint, from_env = cfg.otlp_endpoint, False
    if not endpoint:
        endpoint, from_env = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"), True
    if not endpoint:
        return None
    return OtlpSink(
        _traces_url(endpoint, from_env),
        headers=cfg.otlp_headers,
        capture_content=cfg.capture_content,
        extra_patterns=cfg.scrub_patterns,
    )
