"""OpenTelemetry export following the GenAI semantic conventions, with OpenInference mirrors.

Each trace becomes one OTel trace: a root span `invoke_agent <env>` for the episode, and one
span per stored span, named and attributed as the GenAI conventions say:

| our kind          | gen_ai.operation.name | span name                | OTel kind | OpenInference |
|-------------------|-----------------------|--------------------------|-----------|---------------|
| llm               | chat                  | `chat <model>`           | CLIENT    | LLM           |
| tool              | execute_tool          | `execute_tool <tool>`    | INTERNAL  | TOOL          |
| retrieval         | retrieval             | `retrieval <collection>` | CLIENT    | RETRIEVER     |
| agent, subagent   | invoke_agent          | `invoke_agent <name>`    | INTERNAL  | AGENT         |

Messages follow the GenAI "parts" shape: `gen_ai.input.messages` / `gen_ai.output.messages` are
JSON arrays of `{role, parts: [{type: "text", content} | {type: "tool_call", id, name,
arguments} | {type: "tool_call_response", id, response}]}`; leading system messages go to
`gen_ai.system_instructions`, tool schemas to `gen_ai.tool.definitions`. Arize Phoenix and
Arize AX display OpenInference attributes (`openinference.span.kind`, `input.value`,
`output.value`, `llm.input_messages.N.message.*`, `llm.token_count.*`,
`retrieval.documents.N.document.*`, `session.id`), so each span carries those too, mirroring
the GenAI ones: Phoenix 20 also derives them from `gen_ai.*` when it ingests a span (what a
span states wins), but older Phoenix and Arize AX do not, and no agent span gets an
`input.value` that way. Langfuse reads the GenAI ones.

A thread's turns share `gen_ai.conversation.id` (and OpenInference `session.id`): the agent's
thread id from the trace's metadata (`thread_id`, else `session_id`), else the trace id.
Grades and feedback ride on the root span as `gen_ai.evaluation.result` events.

Content (messages, tool arguments and results, retrieval queries and texts, the task, the
answer, grade explanations, error messages, and any string user attribute) is exported only
with `capture_content`; every exported string first goes through the one scrubber
(`traces.scrub`, plus `[traces] scrub_patterns`).

Ids: our trace id (32 hex) is the OTel trace id; a span id is the first 16 hex of ours; other
ids are hashed, so the mapping is deterministic. `export_otlp_json` writes an OTLP/JSON file;
`push_traces` sends stored traces over OTLP/HTTP protobuf; `OtlpSink` sends spans live from a
bounded background queue. Endpoint, headers and service name follow the standard OTEL_*
variables unless `[traces]` sets them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from tools.errors import SelftuneError
from traces.schemas import Grade, Span, Trace, TracesConfig
from traces.scrub import scrub_grade, scrub_span, scrub_trace, scrub_value

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
_OPENINFERENCE_KIND = {
    "llm": "LLM",
    "tool": "TOOL",
    "retrieval": "RETRIEVER",
    "agent": "AGENT",
    "subagent": "AGENT",
}
# user attributes (span.attributes) that never hold user content: exported without capture_content
_SAFE_ATTRS = frozenset({"subagent", "depth", "status", "steps", "tools"})
_HEX32 = re.compile(r"[0-9a-f]{32}")
_IDENTIFIER = re.compile(r"[A-Za-z_][\w.]*")
JSON_MIME, TEXT_MIME = "application/json", "text/plain"

GradesOf = Callable[[str], Sequence[Grade]]  # trace id -> its grades (e.g. TraceStore.grades)


class OtlpPushError(SelftuneError, RuntimeError):
    """Stored traces could not be pushed to an OTLP endpoint; the message names it and why."""


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
class OtelEvent:
    """A span event (a grade, as `gen_ai.evaluation.result`)."""

    name: str
    time_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)


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
    events: list[OtelEvent] = field(default_factory=list)


def _ns(t: float) -> int:
    return int(t * 1_000_000_000)


def _json(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False, default=str)


def _error_type(error: str) -> str:
    """The exception class an error message starts with ("ValueError: ..."), else `_OTHER`
    (the conventions' fallback), so no message text leaks into `error.type`."""
    head = error.split(":", 1)[0].strip()
    return head if _IDENTIFIER.fullmatch(head) else "_OTHER"


def conversation_id(trace: Trace) -> str:
    """The id that ties a thread's turns together: the agent's thread id (or a session id) from
    the trace's metadata, else the trace's own id."""
    for key in ("thread_id", "session_id", "conversation_id"):
        v = trace.metadata.get(key)
        if isinstance(v, str | int) and str(v):
            return str(v)
    return trace.id


def _thread(trace: Trace) -> str | None:
    cid = conversation_id(trace)
    return None if cid == trace.id else cid


# --- messages: our (OpenAI-style) dicts -> GenAI parts and OpenInference attributes -----------


def _text(content: Any) -> str:
    """A message's content as text (a list of OpenAI content parts joins their texts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text", "") for p in content if isinstance(p, dict) and "text" in p]
        return "".join(texts) if texts else _json(content)
    return _json(content)


def _arguments(args: Any) -> Any:
    if isinstance(args, str):
        try:
            return json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return args
    return args


def _genai_message(m: dict[str, Any]) -> dict[str, Any]:
    role = str(m.get("role") or "user")
    parts: list[dict[str, Any]] = []
    if role == "tool":
        parts.append(
            {
                "type": "tool_call_response",
                "id": m.get("tool_call_id") or "",
                "response": _text(m.get("content")),
            }
        )
    else:
        text = _text(m.get("content"))
        if text:
            parts.append({"type": "text", "content": text})
        for c in m.get("tool_calls") or []:
            fn = c.get("function") or {}
            parts.append(
                {
                    "type": "tool_call",
                    "id": c.get("id") or "",
                    "name": fn.get("name") or "",
                    "arguments": _arguments(fn.get("arguments")),
                }
            )
    out: dict[str, Any] = {"role": role, "parts": parts}
    if m.get("name"):
        out["name"] = m["name"]
    return out


def genai_messages(
    messages: Sequence[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Our message dicts as (system instruction parts, input messages) in the GenAI shape.

    The leading system messages are the agent's instructions, given apart from the chat
    history (the system prompt of the config), so they become `gen_ai.system_instructions`."""
    i = 0
    system: list[dict[str, Any]] = []
    while i < len(messages) and messages[i].get("role") == "system":
        text = _text(messages[i].get("content"))
        if text:
            system.append({"type": "text", "content": text})
        i += 1
    return system, [_genai_message(m) for m in messages[i:]]


def genai_tool_definitions(tools: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI tool schemas ({type, function: {name, description, parameters}}) flattened to
    the GenAI shape ({type, name, description, parameters})."""
    out = []
    for t in tools:
        fn = t.get("function") if isinstance(t.get("function"), dict) else t
        d: dict[str, Any] = {"type": t.get("type") or "function", "name": fn.get("name") or ""}
        for key in ("description", "parameters"):
            if fn.get(key) is not None:
                d[key] = fn[key]
        out.append(d)
    return out


def _oi_messages(prefix: str, messages: Sequence[dict[str, Any]], a: dict[str, Any]) -> None:
    """OpenInference's flattened messages: `<prefix>.N.message.role`, `.content`, ..."""
    for i, m in enumerate(messages):
        p = f"{prefix}.{i}.message"
        a[f"{p}.role"] = str(m.get("role") or "user")
        text = _text(m.get("content"))
        if text:
            a[f"{p}.content"] = text
        if m.get("name"):
            a[f"{p}.name"] = str(m["name"])
        if m.get("tool_call_id"):
            a[f"{p}.tool_call_id"] = str(m["tool_call_id"])
        for j, c in enumerate(m.get("tool_calls") or []):
            q = f"{p}.tool_calls.{j}.tool_call"
            fn = c.get("function") or {}
            a[f"{q}.id"] = str(c.get("id") or "")
            a[f"{q}.function.name"] = str(fn.get("name") or "")
            args = fn.get("arguments")
            a[f"{q}.function.arguments"] = args if isinstance(args, str) else _json(args or {})


def _io(a: dict[str, Any], key: str, value: Any) -> None:
    """OpenInference `input.value`/`output.value` with its mime type."""
    if value is None:
        return
    if isinstance(value, str):
        a[f"{key}.value"], a[f"{key}.mime_type"] = value, TEXT_MIME
    else:
        a[f"{key}.value"], a[f"{key}.mime_type"] = _json(value), JSON_MIME


def _task_of(trace: Trace) -> str | None:
    """The episode's prompt: the `task` attribute of its top-level agent span, if stored."""
    for s in trace.spans:
        if s.parent_id is None and isinstance(s.attributes.get("task"), str):
            return s.attributes["task"]
    return None


def _user_text(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "parts": [{"type": "text", "content": text}]}]


def _assistant_text(text: str) -> list[dict[str, Any]]:
    return [{"role": "assistant", "parts": [{"type": "text", "content": text}]}]


# --- attributes --------------------------------------------------------------------------------


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


def _llm_attributes(span: Span, trace: Trace, content: bool, a: dict[str, Any]) -> None:
    llm = span.llm
    assert llm is not None
    model = llm.model or trace.model
    if model:
        a["gen_ai.request.model"] = a["llm.model_name"] = model
    if llm.adapter or trace.adapter:
        a["selftune.adapter"] = llm.adapter or trace.adapter
    if llm.input_tokens is not None:
        a["gen_ai.usage.input_tokens"] = a["llm.token_count.prompt"] = llm.input_tokens
    if llm.output_tokens is not None:
        a["gen_ai.usage.output_tokens"] = a["llm.token_count.completion"] = llm.output_tokens
    if llm.input_tokens is not None and llm.output_tokens is not None:
        a["llm.token_count.total"] = llm.input_tokens + llm.output_tokens
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
    if llm.sampling:
        a["llm.invocation_parameters"] = _json(llm.sampling)
    if not content:
        return
    system, inputs = genai_messages(llm.messages)
    if system:
        a["gen_ai.system_instructions"] = _json(system)
    a["gen_ai.input.messages"] = _json(inputs)
    a["gen_ai.output.messages"] = _json(_output_messages(span))
    if llm.tools:
        a["gen_ai.tool.definitions"] = _json(genai_tool_definitions(llm.tools))
        for i, t in enumerate(llm.tools):
            a[f"llm.tools.{i}.tool.json_schema"] = _json(t)
    _oi_messages("llm.input_messages", llm.messages, a)
    out = {"role": "assistant", "content": llm.completion}
    out["tool_calls"] = [
        {"id": c.id, "function": {"name": c.name, "arguments": c.arguments}} for c in llm.tool_calls
    ]
    _oi_messages("llm.output_messages", [out], a)
    _io(a, "input", {"messages": llm.messages})
    _io(a, "output", llm.completion)


def _tool_attributes(span: Span, content: bool, a: dict[str, Any]) -> None:
    tool = span.tool
    assert tool is not None
    a["gen_ai.tool.name"] = a["tool.name"] = tool.name
    a["gen_ai.tool.type"] = "extension" if tool.server else "function"
    if tool.call_id:
        a["gen_ai.tool.call.id"] = a["tool_call.id"] = tool.call_id
    if tool.server:
        a["selftune.mcp.server"] = tool.server
    if content:
        a["gen_ai.tool.call.arguments"] = _json(tool.arguments)
        _io(a, "input", tool.arguments)
        if tool.result is not None:
            a["gen_ai.tool.call.result"] = tool.result
            _io(a, "output", tool.result)


def _retrieval_attributes(span: Span, content: bool, a: dict[str, Any]) -> None:
    r = span.retrieval
    assert r is not None
    a["gen_ai.data_source.id"] = r.collection
    scores = [float(x) for x in r.scores]
    # ids, scores and sources identify documents; their texts and the query are content
    docs = [
        {"id": d, **({"score": scores[i]} if i < len(scores) else {})} for i, d in enumerate(r.ids)
    ]
    a["gen_ai.retrieval.documents"] = _json(docs)
    a["selftune.retrieval.ids"] = list(r.ids)
    a["selftune.retrieval.scores"] = scores
    for i, d in enumerate(r.ids):
        p = f"retrieval.documents.{i}.document"
        a[f"{p}.id"] = d
        if i < len(scores):
            a[f"{p}.score"] = scores[i]
        if i < len(r.sources) and r.sources[i]:
            a[f"{p}.metadata"] = _json({"source": r.sources[i]})
        if content and i < len(r.texts):
            a[f"{p}.content"] = r.texts[i]
    if content:
        a["gen_ai.retrieval.query.text"] = a["selftune.retrieval.query"] = r.query
        a["selftune.retrieval.texts"] = list(r.texts)
        _io(a, "input", r.query)


def _span_attributes(span: Span, trace: Trace, content: bool) -> dict[str, Any]:
    """`span_attributes` on a span and trace already scrubbed."""
    cid = conversation_id(trace)
    a: dict[str, Any] = {
        "gen_ai.operation.name": _OPERATION[span.kind],
        "gen_ai.conversation.id": cid,
        "gen_ai.provider.name": str(span.attributes.get("provider") or PROVIDER),
        "openinference.span.kind": _OPENINFERENCE_KIND[span.kind],
        "selftune.span.kind": span.kind,
    }
    if cid != trace.id:
        a["session.id"] = cid
    if trace.env:
        a["selftune.env"] = trace.env
    if span.error:
        a["error.type"] = _error_type(span.error)
    if span.llm is not None:
        _llm_attributes(span, trace, content, a)
    if span.tool is not None:
        _tool_attributes(span, content, a)
    if span.retrieval is not None:
        _retrieval_attributes(span, content, a)
    if span.kind in ("agent", "subagent"):
        a["gen_ai.agent.name"] = span.name
        task = span.attributes.get("task")
        if content and isinstance(task, str):
            a["gen_ai.input.messages"] = _json(_user_text(task))
            _io(a, "input", task)
            if span.parent_id is None and trace.answer is not None:
                a["gen_ai.output.messages"] = _json(_assistant_text(trace.answer))
                _io(a, "output", trace.answer)
    for k, v in span.attributes.items():  # user attributes, namespaced
        if k == "provider":
            continue
        plain = isinstance(v, bool | int | float)
        if content or plain or (k in _SAFE_ATTRS):
            a[f"selftune.attr.{k}"] = v if plain or isinstance(v, str) else _json(v)
    return a


def span_attributes(
    span: Span, trace: Trace, capture_content: bool = True, extra_patterns: Sequence[str] = ()
) -> dict[str, Any]:
    """The GenAI semantic-convention attributes of one span, with their OpenInference mirrors
    (every string scrubbed; content only with `capture_content`)."""
    clean = scrub_trace(trace.model_copy(update={"spans": []}), extra_patterns)
    return _span_attributes(scrub_span(span, extra_patterns), clean, capture_content)


def _span_name(span: Span, trace: Trace) -> str:
    op = _OPERATION[span.kind]
    if span.llm is not None:
        return f"{op} {span.llm.model or trace.model or span.name}"
    if span.tool is not None:
        return f"{op} {span.tool.name}"
    if span.retrieval is not None:
        return f"{op} {span.retrieval.collection}"
    return f"{op} {span.name}"


def _status(error: str | None, code: int, content: bool) -> str:
    if code != STATUS_ERROR or not error:
        return ""
    return error if content else _error_type(error)


def _to_otel_span(span: Span, trace: Trace, content: bool) -> OtelSpan:
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
        attributes=_span_attributes(span, trace, content),
        status_code=status,
        status_message=_status(span.error, status, content),
    )


def to_otel_span(
    span: Span, trace: Trace, capture_content: bool = True, extra_patterns: Sequence[str] = ()
) -> OtelSpan:
    """One of our spans as an OTel span (its parent is the episode root for top-level spans)."""
    clean = scrub_trace(trace.model_copy(update={"spans": []}), extra_patterns)
    return _to_otel_span(scrub_span(span, extra_patterns), clean, capture_content)


def grade_event(grade: Grade, capture_content: bool = True) -> OtelEvent:
    """A grade or a person's feedback as a GenAI `gen_ai.evaluation.result` event."""
    a: dict[str, Any] = {
        "gen_ai.evaluation.name": grade.grader,
        "gen_ai.evaluation.score.value": float(grade.value),
        "gen_ai.evaluation.score.label": "pass" if grade.value >= 0.5 else "fail",
        "selftune.grade.source": grade.source,
    }
    if grade.flags:
        a["selftune.grade.flags"] = list(grade.flags)
    if grade.metadata.get("error"):
        a["error.type"] = "grading_failed"
    if capture_content and grade.reason:
        a["gen_ai.evaluation.explanation"] = grade.reason
    return OtelEvent("gen_ai.evaluation.result", _ns(grade.created), a)


def _root_otel_span(
    trace: Trace, content: bool, grades: Sequence[Grade] = (), task: str | None = None
) -> OtelSpan:
    agent = trace.env or "selftune"
    cid = conversation_id(trace)
    a: dict[str, Any] = {
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.agent.name": agent,
        "gen_ai.conversation.id": cid,
        "gen_ai.provider.name": PROVIDER,
        "openinference.span.kind": "AGENT",
        "selftune.status": trace.status,
    }
    if cid != trace.id:
        a["session.id"] = cid
    for key, val in (
        ("gen_ai.request.model", trace.model),
        ("selftune.env", trace.env),
        ("selftune.task_id", trace.task_id),
        ("selftune.adapter", trace.adapter),
    ):
        if val:
            a[key] = val
    if trace.tags:
        a["selftune.tags"] = a["tag.tags"] = list(trace.tags)
    if trace.error:
        a["error.type"] = _error_type(trace.error)
    task = task if task is not None else _task_of(trace)
    if content and task is not None:
        a["gen_ai.input.messages"] = _json(_user_text(task))
        _io(a, "input", task)
    if content and trace.answer is not None:
        a["gen_ai.output.messages"] = _json(_assistant_text(trace.answer))
        _io(a, "output", trace.answer)
    if content and trace.metadata:
        a["metadata"] = _json(trace.metadata)
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
        status_message=_status(trace.error or trace.status, status, content),
        events=[grade_event(g, content) for g in grades],
    )


def _scrub_grades(grades: Sequence[Grade], patterns: Sequence[str]) -> list[Grade]:
    return [scrub_grade(g, patterns) for g in grades]


def root_otel_span(
    trace: Trace,
    capture_content: bool = True,
    extra_patterns: Sequence[str] = (),
    grades: Sequence[Grade] = (),
) -> OtelSpan:
    """The episode itself as the root `invoke_agent` span; `grades` become its events."""
    return _root_otel_span(
        scrub_trace(trace, extra_patterns), capture_content, _scrub_grades(grades, extra_patterns)
    )


def trace_to_otel(
    trace: Trace,
    capture_content: bool = True,
    extra_patterns: Sequence[str] = (),
    grades: Sequence[Grade] = (),
) -> list[OtelSpan]:
    """The root span and every span of `trace` (read with its spans), scrubbed."""
    clean = scrub_trace(trace, extra_patterns)
    root = _root_otel_span(clean, capture_content, _scrub_grades(grades, extra_patterns))
    return [root] + [_to_otel_span(s, clean, capture_content) for s in clean.spans]


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
    if s.events:
        d["events"] = [
            {"timeUnixNano": str(e.time_ns), "name": e.name, "attributes": _kv(e.attributes)}
            for e in s.events
        ]
    return d


def service_name() -> str:
    """OTEL_SERVICE_NAME, else "selftune"."""
    return os.environ.get("OTEL_SERVICE_NAME") or SERVICE_NAME


def otlp_json(
    traces: Iterable[Trace],
    capture_content: bool = True,
    extra_patterns: Sequence[str] = (),
    grades_of: GradesOf | None = None,
) -> dict[str, Any]:
    """An ExportTraceServiceRequest in the OTLP/JSON mapping (hex ids, nanosecond strings)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("selftune")
    except PackageNotFoundError:
        ours = "0"
    spans = [
        otlp_json_span(s)
        for t in traces
        for s in trace_to_otel(
            t, capture_content, extra_patterns, grades_of(t.id) if grades_of else ()
        )
    ]
    return {
        "resourceSpans": [
            {
                "resource": {"attributes": _kv({"service.name": service_name()})},
                "scopeSpans": [{"scope": {"name": SCOPE_NAME, "version": ours}, "spans": spans}],
            }
        ]
    }


def export_otlp_json(
    traces: Iterable[Trace],
    path: str | Path,
    capture_content: bool = True,
    extra_patterns: Sequence[str] = (),
    grades_of: GradesOf | None = None,
) -> int:
    """Write `traces` (read with their spans) to `path` as one OTLP/JSON document (scrubbed),
    with each trace's grades (`grades_of(trace_id)`) as events on its root span.
    Returns the number of OTel spans written (root spans included)."""
    doc = otlp_json(traces, capture_content, extra_patterns, grades_of)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    return len(doc["resourceSpans"][0]["scopeSpans"][0]["spans"])


# --- OTLP/HTTP protobuf: endpoints, live export and push -------------------------------------


def _readable(s: OtelSpan, resource: Any, scope: Any) -> Any:
    from opentelemetry import trace as api
    from opentelemetry.sdk.trace import Event, ReadableSpan
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
        events=[Event(e.name, e.attributes, e.time_ns) for e in s.events],
        kind=api.SpanKind.CLIENT if s.kind == KIND_CLIENT else api.SpanKind.INTERNAL,
        status=Status(code, s.status_message or None) if code == StatusCode.ERROR else Status(code),
        start_time=s.start_ns,
        end_time=s.end_ns,
        instrumentation_scope=scope,
    )


def _resource_and_scope() -> tuple[Any, Any]:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    # Resource.create also reads OTEL_RESOURCE_ATTRIBUTES
    return Resource.create({"service.name": service_name()}), InstrumentationScope(SCOPE_NAME)


def _traces_url(endpoint: str, from_env: bool) -> str:
    """OTEL_EXPORTER_OTLP_ENDPOINT is a base URL (the OTel spec appends /v1/traces); a
    configured URL is used as given unless it has no path."""
    endpoint = endpoint.rstrip("/")
    if endpoint.endswith("/v1/traces"):
        return endpoint
    if from_env or not urlparse(endpoint).path:
        return endpoint + "/v1/traces"
    return endpoint


def otlp_endpoint(configured: str | None = None) -> str | None:
    """The traces URL to send to: `configured` (`[traces] otlp_endpoint` or a --endpoint), else
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT (used as given), else OTEL_EXPORTER_OTLP_ENDPOINT plus
    /v1/traces; None when none is set."""
    if configured:
        return _traces_url(configured, from_env=False)
    url = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if url:
        return url
    base = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return _traces_url(base, from_env=True) if base else None


def parse_headers(s: str) -> dict[str, str]:
    """OTEL_EXPORTER_OTLP_HEADERS' format: `key1=value1,key2=value2`, values URL-encoded."""
    out: dict[str, str] = {}
    for item in s.split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            out[unquote(key.strip())] = unquote(value.strip())
    return out


def otlp_headers(configured: dict[str, str] | None = None) -> dict[str, str]:
    """`configured` headers when set, else OTEL_EXPORTER_OTLP_TRACES_HEADERS, else
    OTEL_EXPORTER_OTLP_HEADERS."""
    if configured:
        return dict(configured)
    for var in ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"):
        if os.environ.get(var):
            return parse_headers(os.environ[var])
    return {}


class OtlpSink:
    """Sends spans to an OTLP/HTTP (protobuf) endpoint as the tracer writes them.

    A Tracer sink: `on_write` runs on the tracer's writer thread and only hands spans to
    opentelemetry-sdk's BatchSpanProcessor, whose own thread posts them. Its queue is bounded
    (`max_queue` spans; beyond that they are dropped with a logged warning) and each post times
    out after `timeout_s`, so a slow or dead collector never slows or breaks an episode.
    Grades come after the episode, so live export carries none: `push_traces` sends them.
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
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self.endpoint = endpoint
        self.capture_content = capture_content
        self.extra_patterns = tuple(extra_patterns)
        self._resource, self._scope = _resource_and_scope()
        self._traces: dict[str, Trace] = {}
        self._tasks: dict[str, str] = {}  # trace id -> its prompt, for the root span
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
        p = self.extra_patterns
        for t in traces:
            self._traces[t.id] = t
        for s in spans:
            t = self._traces.get(s.trace_id) or Trace(id=s.trace_id)
            if s.parent_id is None and isinstance(s.attributes.get("task"), str):
                self._tasks[s.trace_id] = s.attributes["task"]
            self._emit(to_otel_span(s, t, self.capture_content, p))
        for t in traces:
            if t.status != "running":
                task = self._tasks.pop(t.id, None)
                clean = scrub_trace(t.model_copy(update={"spans": []}), p)
                task = scrub_value(task, p) if task is not None else None
                self._emit(_root_otel_span(clean, self.capture_content, task=task))
                self._traces.pop(t.id, None)

    def force_flush(self, timeout_s: float = 10.0) -> bool:
        """Post what is queued now; False if it did not finish in time."""
        return self._processor.force_flush(int(timeout_s * 1000))

    def shutdown(self) -> None:
        self._processor.shutdown()


def otlp_sink_from_config(cfg: TracesConfig) -> OtlpSink | None:
    """An OtlpSink for `[traces] otlp_endpoint` (else the OTEL_EXPORTER_OTLP_* variables), or
    None when no endpoint is set."""
    endpoint = otlp_endpoint(cfg.otlp_endpoint)
    if not endpoint:
        return None
    return OtlpSink(
        endpoint,
        headers=otlp_headers(cfg.otlp_headers),
        capture_content=cfg.capture_content,
        extra_patterns=cfg.scrub_patterns,
    )


def _check_reachable(endpoint: str, timeout_s: float) -> None:
    import socket

    u = urlparse(endpoint)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise OtlpPushError(
            f"OTLP endpoint {endpoint!r} is not an http(s) URL: give one like "
            "http://localhost:4318/v1/traces"
        )
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        socket.create_connection((u.hostname, port), timeout=timeout_s).close()
    except OSError as e:
        raise OtlpPushError(
            f"cannot reach the OTLP endpoint {endpoint} ({e.strerror or e}): is the collector "
            "running and listening for OTLP/HTTP there?"
        ) from None


class _LastError(logging.Handler):
    """Keeps the exporter's last warning (it logs the HTTP status and body of a refusal)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.message = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.message = record.getMessage()


def push_traces(
    traces: Iterable[Trace],
    endpoint: str,
    headers: dict[str, str] | None = None,
    *,
    capture_content: bool = True,
    extra_patterns: Sequence[str] = (),
    grades_of: GradesOf | None = None,
    batch_size: int = 512,
    timeout_s: float = 10.0,
) -> int:
    """Send stored `traces` (read with their spans) to the OTLP/HTTP protobuf `endpoint` (the
    full traces URL, e.g. http://localhost:6006/v1/traces) in batches of `batch_size` spans,
    scrubbed, each trace's grades as events on its root span. Returns the number of spans sent.
    Raises OtlpPushError when the endpoint cannot be reached or refuses a batch."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import SpanExportResult

    _check_reachable(endpoint, min(timeout_s, 5.0))
    exporter = OTLPSpanExporter(endpoint=endpoint, headers=dict(headers or {}), timeout=timeout_s)
    resource, scope = _resource_and_scope()
    exporter_log = logging.getLogger("opentelemetry.exporter.otlp")
    last = _LastError()
    exporter_log.addHandler(last)
    sent, batch = 0, []

    def flush() -> None:
        nonlocal sent
        if batch and exporter.export(batch) != SpanExportResult.SUCCESS:
            raise OtlpPushError(
                f"the OTLP endpoint {endpoint} refused {len(batch)} spans after {sent} were "
                f"sent: {last.message or 'no reason given'}"
            )
        sent += len(batch)
        batch.clear()

    try:
        for t in traces:
            grades = grades_of(t.id) if grades_of else ()
            for s in trace_to_otel(t, capture_content, extra_patterns, grades):
                batch.append(_readable(s, resource, scope))
                if len(batch) >= batch_size:
                    flush()
        flush()
    finally:
        exporter_log.removeHandler(last)
        exporter.shutdown()
    return sent
