"""OpenTelemetry export: the OTLP/JSON file, and live OTLP/HTTP export to a real receiver on
127.0.0.1 (decoding ExportTraceServiceRequest), plus a dead endpoint that must not hurt."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from _traces_fixtures import ADD, make_trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from traces.otel import OtlpSink, export_otlp_json, otel_span_id, otlp_sink_from_config
from traces.schemas import LlmData, ToolData, TracesConfig
from traces.store import TraceStore
from traces.tracer import Tracer


def _attrs(kvs) -> dict:
    out = {}
    for kv in kvs:
        v = kv["value"]
        out[kv["key"]] = next(iter(v.values()))
    return out


def test_otlp_json_file_follows_genai_conventions(tmp_path: Path):
    t = make_trace(calls=[ADD, ADD], env="calc", adapter="v3")
    t.spans[1].llm.messages[0]["content"] = "my key is sk-abcdefghijklmnopqrstuvwxyz0123"
    out = tmp_path / "otel.json"
    assert export_otlp_json([t], out) == len(t.spans) + 1
    doc = json.loads(out.read_text())
    rs = doc["resourceSpans"][0]
    assert _attrs(rs["resource"]["attributes"])["service.name"] == "selftune"
    spans = rs["scopeSpans"][0]["spans"]
    by_name = {s["name"]: s for s in spans}
    root = by_name["invoke_agent calc"]
    assert "parentSpanId" not in root and root["traceId"] == t.id and root["status"]["code"] == 1
    assert all(len(s["traceId"]) == 32 and len(s["spanId"]) == 16 for s in spans)
    assert all(isinstance(s["startTimeUnixNano"], str) for s in spans)
    chat = by_name["chat smollm2"]
    a = _attrs(chat["attributes"])
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "smollm2"
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == ("40", "12")
    assert a["gen_ai.conversation.id"] == t.id and a["selftune.adapter"] == "v3"
    assert chat["kind"] == 3 and chat["parentSpanId"] == otel_span_id(t.spans[0].id)
    assert "[REDACTED:openai_key]" in a["gen_ai.input.messages"]
    assert "sk-abc" not in out.read_text()
    out_msgs = json.loads(a["gen_ai.output.messages"])
    assert out_msgs[0]["parts"][1] == {"type": "tool_call", "id": "c1", "name": "calculator",
                                        "arguments": {"e": "2+3"}}  # fmt: skip
    tool = _attrs(by_name["execute_tool calculator"]["attributes"])
    assert (
        tool["gen_ai.operation.name"] == "execute_tool" and tool["gen_ai.tool.name"] == "calculator"
    )
    assert tool["gen_ai.tool.call.result"] == "5" and tool["selftune.mcp.server"] == "calc_mcp"
    agent = _attrs(by_name["invoke_agent orchestrator"]["attributes"])
    assert agent["gen_ai.agent.name"] == "orchestrator"
    assert _attrs(by_name["retrieval docs"]["attributes"])["gen_ai.operation.name"] == "retrieval"
    assert by_name["invoke_agent orchestrator"]["parentSpanId"] == root["spanId"]

    export_otlp_json([t], out, capture_content=False)
    text = out.read_text()
    for key in ("gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.tool.call.arguments",
                "gen_ai.tool.call.result"):  # fmt: skip
        assert key not in text


class _Receiver:
    """A minimal OTLP/HTTP collector: decodes each POST /v1/traces body."""

    def __init__(self):
        self.requests: list[ExportTraceServiceRequest] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                assert self.path == "/v1/traces"
                assert self.headers["Content-Type"] == "application/x-protobuf"
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                outer.requests.append(req)
                payload = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans(self) -> list:
        return [s for r in self.requests for rs in r.resource_spans for ss in rs.scope_spans
                for s in ss.spans]  # fmt: skip


@pytest.fixture
def receiver():
    r = _Receiver()
    yield r
    r.server.shutdown()


def _pb_attrs(span) -> dict:
    out = {}
    for kv in span.attributes:
        out[kv.key] = getattr(kv.value, kv.value.WhichOneof("value"))
    return out


def test_live_export_reaches_a_real_otlp_http_receiver(tmp_path: Path, receiver, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    sink = otlp_sink_from_config(TracesConfig(capture_content=True))
    assert sink is not None and sink.endpoint == receiver.url + "/v1/traces"
    store = TraceStore(tmp_path / "traces.db")
    tracer = Tracer(store, [sink])
    with tracer.trace(env="calc", model="smollm2", task_id="t1") as t:
        with tracer.span(
            "llm",
            "chat",
            llm=LlmData(
                messages=[{"role": "user", "content": "2+3?"}], input_tokens=7, output_tokens=3
            ),
        ) as s:
            s.llm.completion = "5"
        with tracer.span(
            "tool",
            "calculator",
            tool=ToolData(name="calculator", call_id="c9", arguments={"e": "2+3"}),
        ) as s:
            s.tool.result = "5"
        t.answer = "5"
    tracer.close()  # shuts the sink down, which posts what is queued
    spans = {s.name: s for s in receiver.spans()}
    assert set(spans) == {"invoke_agent calc", "chat smollm2", "execute_tool calculator"}
    chat = spans["chat smollm2"]
    assert chat.trace_id.hex() == t.id
    assert chat.parent_span_id == spans["invoke_agent calc"].span_id
    a = _pb_attrs(chat)
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.usage.input_tokens"] == 7
    assert a["gen_ai.provider.name"] == "selftune.local"
    assert json.loads(a["gen_ai.input.messages"]) == [
        {"role": "user", "parts": [{"type": "text", "content": "2+3?"}]}
    ]
    tool = _pb_attrs(spans["execute_tool calculator"])
    assert tool["gen_ai.tool.call.id"] == "c9" and tool["gen_ai.tool.call.result"] == "5"
    root = _pb_attrs(spans["invoke_agent calc"])
    assert root["gen_ai.conversation.id"] == t.id and root["selftune.status"] == "ok"
    store.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dead_endpoint_neither_raises_nor_blocks_episodes(tmp_path: Path):
    sink = OtlpSink(f"http://127.0.0.1:{_free_port()}/v1/traces", timeout_s=1.0,
                    schedule_delay_ms=10)  # fmt: skip
    store = TraceStore(tmp_path / "traces.db")
    tracer = Tracer(store, [sink])
    worst = 0.0
    for i in range(30):
        t0 = time.perf_counter()
        with tracer.trace(env="calc", task_id=str(i)):
            with tracer.span("tool", "calculator", tool=ToolData(name="calculator")):
                pass
        worst = max(worst, time.perf_counter() - t0)
    # a blocked episode would wait for the exporter's 1 s timeout; these take milliseconds
    assert worst < 0.5
    assert store.count(limit=None) == 30
    tracer.close()
    store.close()
