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

from traces.otel import (
    OtlpPushError,
    OtlpSink,
    export_otlp_json,
    otel_span_id,
    otlp_endpoint,
    otlp_headers,
    otlp_sink_from_config,
    push_traces,
    root_span_id,
)
from traces.schemas import Grade, LlmData, RetrievalData, Span, ToolCall, ToolData, TracesConfig
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
    """A minimal OTLP/HTTP collector: decodes each POST /v1/traces body (or, with `status`,
    refuses it the way a collector refuses JSON: 415 and a reason)."""

    def __init__(self, status: int = 200):
        self.requests: list[ExportTraceServiceRequest] = []
        self.headers: list[dict[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                assert self.path == "/v1/traces"
                assert self.headers["Content-Type"] == "application/x-protobuf"
                outer.headers.append(dict(self.headers))
                if status != 200:
                    reason = b"unsupported media type"
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(reason)))
                    self.end_headers()
                    self.wfile.write(reason)
                    return
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


# --- the GenAI shapes, OpenInference mirrors, content and scrubbing ---------------------------

SECRET = "PROMPT-SENTINEL-4242"  # user content: must vanish without capture_content


def _rich_trace():
    """An episode of a thread whose every text holds SECRET: a system prompt, a user turn, a
    tool call and its result, a retrieval, a failed span, an answer, and the task attribute."""
    t = make_trace(calls=[ADD], env="calc", metadata={"thread_id": "thread-7"})
    agent, llm, tool, retrieval = t.spans
    agent.attributes.update({"task": f"what is 2+3? {SECRET}", "tools": ["calculator"]})
    llm.llm.messages = [
        {"role": "system", "content": f"You are terse. {SECRET}"},
        {"role": "user", "content": f"what is 2+3? {SECRET}"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"id": "c0", "type": "function",
                         "function": {"name": "calculator", "arguments": {"e": SECRET}}}]},
        {"role": "tool", "tool_call_id": "c0", "name": "calculator", "content": f"5 {SECRET}"},
    ]  # fmt: skip
    llm.llm.tools = [{"type": "function", "function": {"name": "calculator",
                      "description": "evaluate", "parameters": {"type": "object"}}}]  # fmt: skip
    llm.llm.tool_calls = [ToolCall(id="c1", name="calculator", arguments={"e": SECRET})]
    llm.llm.completion = f"<tool_call>{SECRET}</tool_call>"
    tool.tool.arguments, tool.tool.result = {"e": SECRET}, f"5 {SECRET}"
    retrieval.retrieval = RetrievalData(
        query=f"adding {SECRET}", collection="docs", ids=["d1", "d2"], scores=[0.9, 0.5],
        texts=[f"addition adds {SECRET}", "sums"], sources=["math.md", "sums.md"],
    )  # fmt: skip
    failed = Span(trace_id=t.id, parent_id=agent.id, kind="tool", name="calculator",
                  start=t.start + 0.95, end=t.start + 0.96, status="error",
                  error=f"ValueError: cannot parse {SECRET}",
                  tool=ToolData(name="calculator", arguments={"e": SECRET}))  # fmt: skip
    t.spans.append(failed)
    t.answer = f"5 {SECRET}"
    grade = Grade(trace_id=t.id, value=0.0, source="human", grader="human:alice",
                  reason=f"wrong {SECRET}", flags=["no_tool"])  # fmt: skip
    return t, grade


def _export(tmp_path: Path, t, grades=(), **kw) -> tuple[str, dict[str, dict]]:
    out = tmp_path / "otel.json"
    export_otlp_json([t], out, grades_of=lambda _id: list(grades), **kw)
    text = out.read_text()
    spans = json.loads(text)["resourceSpans"][0]["scopeSpans"][0]["spans"]
    return text, {s["spanId"]: s for s in spans}


def test_messages_use_genai_parts_and_openinference_mirrors(tmp_path: Path):
    t, grade = _rich_trace()
    _, spans = _export(tmp_path, t, [grade])
    llm = _attrs(spans[otel_span_id(t.spans[1].id)]["attributes"])
    assert json.loads(llm["gen_ai.system_instructions"]) == [
        {"type": "text", "content": f"You are terse. {SECRET}"}
    ]
    assert json.loads(llm["gen_ai.input.messages"]) == [
        {"role": "user", "parts": [{"type": "text", "content": f"what is 2+3? {SECRET}"}]},
        {"role": "assistant", "parts": [{"type": "tool_call", "id": "c0", "name": "calculator",
                                         "arguments": {"e": SECRET}}]},
        {"role": "tool", "name": "calculator",
         "parts": [{"type": "tool_call_response", "id": "c0", "response": f"5 {SECRET}"}]},
    ]  # fmt: skip
    assert json.loads(llm["gen_ai.tool.definitions"]) == [
        {"type": "function", "name": "calculator", "description": "evaluate",
         "parameters": {"type": "object"}}
    ]  # fmt: skip
    # what Phoenix reads
    assert llm["openinference.span.kind"] == "LLM" and llm["llm.model_name"] == "smollm2"
    assert llm["llm.input_messages.0.message.role"] == "system"
    assert llm["llm.input_messages.1.message.content"] == f"what is 2+3? {SECRET}"
    assert llm["llm.input_messages.2.message.tool_calls.0.tool_call.function.name"] == "calculator"
    assert json.loads(
        llm["llm.input_messages.2.message.tool_calls.0.tool_call.function.arguments"]
    ) == {"e": SECRET}
    assert llm["llm.input_messages.3.message.tool_call_id"] == "c0"
    assert llm["llm.output_messages.0.message.role"] == "assistant"
    assert llm["llm.output_messages.0.message.content"] == f"<tool_call>{SECRET}</tool_call>"
    assert (llm["llm.token_count.prompt"], llm["llm.token_count.completion"],
            llm["llm.token_count.total"]) == ("40", "12", "52")  # fmt: skip
    assert json.loads(llm["input.value"])["messages"][1]["role"] == "user"
    assert llm["input.mime_type"] == "application/json" and SECRET in llm["output.value"]
    assert json.loads(llm["llm.tools.0.tool.json_schema"])["function"]["name"] == "calculator"

    tool = _attrs(spans[otel_span_id(t.spans[2].id)]["attributes"])
    assert tool["openinference.span.kind"] == "TOOL" and tool["tool.name"] == "calculator"
    assert (
        json.loads(tool["input.value"]) == {"e": SECRET} and tool["output.value"] == f"5 {SECRET}"
    )

    root = spans[root_span_id(t.id)]
    ra = _attrs(root["attributes"])
    assert ra["openinference.span.kind"] == "AGENT"
    assert ra["input.value"] == f"what is 2+3? {SECRET}" and ra["output.value"] == f"5 {SECRET}"
    assert json.loads(ra["gen_ai.output.messages"])[0]["parts"][0]["content"] == f"5 {SECRET}"
    agent = _attrs(spans[otel_span_id(t.spans[0].id)]["attributes"])
    assert agent["openinference.span.kind"] == "AGENT" and agent["input.value"].endswith(SECRET)


def test_a_thread_shares_one_conversation_id(tmp_path: Path):
    t, _ = _rich_trace()
    _, spans = _export(tmp_path, t)
    for s in spans.values():
        a = _attrs(s["attributes"])
        assert a["gen_ai.conversation.id"] == "thread-7" and a["session.id"] == "thread-7"
    lone = make_trace()  # no thread: the trace is its own conversation, and no Phoenix session
    _, spans = _export(tmp_path, lone)
    a = _attrs(spans[root_span_id(lone.id)]["attributes"])
    assert a["gen_ai.conversation.id"] == lone.id and "session.id" not in a


def test_retrieval_spans_carry_document_ids_and_scores(tmp_path: Path):
    t, _ = _rich_trace()
    for capture in (True, False):
        _, spans = _export(tmp_path, t, capture_content=capture)
        r = _attrs(spans[otel_span_id(t.spans[3].id)]["attributes"])
        assert r["openinference.span.kind"] == "RETRIEVER" and r["gen_ai.data_source.id"] == "docs"
        assert json.loads(r["gen_ai.retrieval.documents"]) == [
            {"id": "d1", "score": 0.9}, {"id": "d2", "score": 0.5}
        ]  # fmt: skip
        assert (
            r["retrieval.documents.1.document.id"],
            r["retrieval.documents.1.document.score"],
        ) == ("d2", 0.5)
        assert json.loads(r["retrieval.documents.0.document.metadata"]) == {"source": "math.md"}
        assert ("retrieval.documents.0.document.content" in r) is capture
        assert ("gen_ai.retrieval.query.text" in r) is capture


def test_grades_are_evaluation_events_on_the_root_span(tmp_path: Path):
    t, grade = _rich_trace()
    verifier = Grade(trace_id=t.id, value=1.0, source="verifier", grader="numeric", reason="ok")
    _, spans = _export(tmp_path, t, [verifier, grade])
    events = spans[root_span_id(t.id)]["events"]
    assert [e["name"] for e in events] == ["gen_ai.evaluation.result"] * 2
    human = _attrs(events[1]["attributes"])
    assert human["gen_ai.evaluation.name"] == "human:alice"
    assert human["gen_ai.evaluation.score.value"] == 0.0
    assert human["gen_ai.evaluation.score.label"] == "fail"
    assert human["gen_ai.evaluation.explanation"] == f"wrong {SECRET}"
    assert human["selftune.grade.source"] == "human"
    assert _attrs(events[0]["attributes"])["gen_ai.evaluation.score.label"] == "pass"
    assert all("events" not in s for sid, s in spans.items() if sid != root_span_id(t.id))


def test_without_capture_content_no_user_content_leaves(tmp_path: Path, receiver):
    t, grade = _rich_trace()
    text, spans = _export(tmp_path, t, [grade], capture_content=False)
    assert SECRET not in text
    # what stays: the shape of the episode, its numbers and names
    llm = _attrs(spans[otel_span_id(t.spans[1].id)]["attributes"])
    assert llm["gen_ai.usage.input_tokens"] == "40" and llm["llm.token_count.total"] == "52"
    failed = spans[otel_span_id(t.spans[4].id)]
    assert failed["status"] == {"code": 2, "message": "ValueError"}
    assert _attrs(failed["attributes"])["error.type"] == "ValueError"
    agent = _attrs(spans[otel_span_id(t.spans[0].id)]["attributes"])
    assert "selftune.attr.task" not in agent and agent["selftune.attr.tools"] == '["calculator"]'
    assert _attrs(spans[root_span_id(t.id)]["events"][0]["attributes"])[
        "gen_ai.evaluation.score.value"] == 0.0  # fmt: skip

    push_traces([t], receiver.url + "/v1/traces", capture_content=False,
                grades_of=lambda _id: [grade])  # fmt: skip
    assert SECRET not in str(receiver.requests)
    assert len(receiver.spans()) == len(t.spans) + 1


def test_the_scrubber_covers_every_exported_string(tmp_path: Path, receiver):
    t, grade = _rich_trace()
    t.tags, t.error = ["token=SECRET-1"], "RuntimeError: SECRET-2"
    t.spans[0].attributes["note"] = "SECRET-3"
    t.metadata["user"] = "bob@example.com"
    grade.reason = "SECRET-4"
    text, spans = _export(tmp_path, t, [grade], extra_patterns=[SECRET, r"SECRET-\d"])
    for leak in (SECRET, "SECRET-", "bob@example.com"):
        assert leak not in text
    assert "[REDACTED:custom]" in text and "[REDACTED:email]" in text
    # scrubbed per string, so the JSON attributes stay valid JSON
    llm = _attrs(spans[otel_span_id(t.spans[1].id)]["attributes"])
    assert json.loads(llm["gen_ai.input.messages"])[0]["parts"][0]["content"].endswith(
        "[REDACTED:custom]"
    )
    push_traces([t], receiver.url + "/v1/traces", extra_patterns=[SECRET, r"SECRET-\d"],
                grades_of=lambda _id: [grade])  # fmt: skip
    sent = str(receiver.requests)
    assert SECRET not in sent and "SECRET-" not in sent and "bob@example.com" not in sent

    # the live sink scrubs too
    sink = OtlpSink(receiver.url + "/v1/traces", extra_patterns=[SECRET], schedule_delay_ms=10)
    sink.on_write([t], t.spans)
    sink.shutdown()
    assert SECRET not in str(receiver.requests[-1])


# --- push ---------------------------------------------------------------------------------


def test_push_sends_stored_traces_in_protobuf_batches(receiver):
    traces = [make_trace(calls=[ADD]) for _ in range(3)]  # 5 spans each with the root
    grades = {traces[0].id: [Grade(trace_id=traces[0].id, value=1.0, source="verifier",
                                   grader="numeric")]}  # fmt: skip
    n = push_traces(traces, receiver.url + "/v1/traces", {"x-api-key": "k1"},
                    grades_of=lambda i: grades.get(i, []), batch_size=4)  # fmt: skip
    assert n == 15 and [len(r.resource_spans[0].scope_spans[0].spans)
                        for r in receiver.requests] == [4, 4, 4, 3]  # fmt: skip
    assert all(h["x-api-key"] == "k1" for h in receiver.headers)
    spans = receiver.spans()
    roots = [s for s in spans if not s.parent_span_id]
    assert {s.trace_id.hex() for s in roots} == {t.id for t in traces}
    ev = [e for s in roots for e in s.events]
    assert [e.name for e in ev] == ["gen_ai.evaluation.result"]
    by_id = {s.span_id: s for s in spans}
    for s in spans:  # every parent is in the push
        assert not s.parent_span_id or s.parent_span_id in by_id


def test_push_says_why_it_failed(receiver):
    dead = f"http://127.0.0.1:{_free_port()}/v1/traces"
    with pytest.raises(OtlpPushError, match=r"cannot reach the OTLP endpoint .*collector running"):
        push_traces([make_trace()], dead)
    refusing = _Receiver(status=415)
    try:
        with pytest.raises(OtlpPushError, match=r"refused 4 spans after 0 were sent: .*415"):
            push_traces([make_trace()], refusing.url + "/v1/traces")
    finally:
        refusing.server.shutdown()
    with pytest.raises(OtlpPushError, match="not an http"):
        push_traces([make_trace()], "localhost:4318")


def test_standard_otel_variables_and_config_precedence(monkeypatch, receiver):
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    assert otlp_endpoint() is None and otlp_sink_from_config(TracesConfig()) is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://base:4318/")
    assert otlp_endpoint() == "http://base:4318/v1/traces"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4318/custom")
    assert otlp_endpoint() == "http://traces:4318/custom"  # used as given
    assert otlp_endpoint("http://cfg:6006") == "http://cfg:6006/v1/traces"  # config wins
    assert otlp_endpoint("http://cfg:6006/api/public/otel/v1/traces").endswith("/otel/v1/traces")

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "Authorization=Basic%20abc%3D, x-team = a")
    assert otlp_headers() == {"Authorization": "Basic abc=", "x-team": "a"}
    assert otlp_headers({"x-cfg": "1"}) == {"x-cfg": "1"}

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.url + "/v1/traces")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "my-agent")
    sink = otlp_sink_from_config(TracesConfig())
    assert sink is not None and sink.endpoint == receiver.url + "/v1/traces"
    t = make_trace()
    sink.on_write([t], t.spans)
    sink.shutdown()
    assert receiver.headers[0]["x-team"] == "a"
    res = {kv.key: kv.value.string_value
           for kv in receiver.requests[0].resource_spans[0].resource.attributes}  # fmt: skip
    assert res["service.name"] == "my-agent"


def test_traces_push_command(tmp_path: Path, monkeypatch, receiver):
    from typer.testing import CliRunner

    from agent.cli.traces import traces_app

    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SELFTUNE_HOME", str(tmp_path / "ws"))
    monkeypatch.chdir(tmp_path)  # no stray ./selftune.toml
    store = TraceStore(tmp_path / "ws" / "traces.db")
    calc, web = make_trace(calls=[ADD], env="calc"), make_trace(env="web")
    for t in (calc, web):
        store.save(t)
    store.add_grade(Grade(trace_id=calc.id, value=1.0, source="verifier", grader="numeric"))
    store.close()

    def push(*args: str):
        return CliRunner().invoke(traces_app, ["push", *args], terminal_width=200)

    res = push("--endpoint", receiver.url, "--env", "calc", "--since", "7d")
    assert res.exit_code == 0, res.output
    assert f"sent 5 OTel spans to {receiver.url}/v1/traces" in res.output
    assert {s.trace_id.hex() for s in receiver.spans()} == {calc.id}
    assert [e.name for s in receiver.spans() for e in s.events] == ["gen_ai.evaluation.result"]

    res = push()
    assert res.exit_code == 1 and "no OTLP endpoint" in res.output
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{_free_port()}")
    res = push("--env", "web")
    assert res.exit_code == 1 and "cannot reach the OTLP endpoint" in res.output
