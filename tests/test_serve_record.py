"""Every chat completion `selftune serve` answers becomes a trace, whoever the client is: the
official `openai` package, a LangChain agent, and proxy mode in front of a second real server.
Feedback posted over HTTP lands in the same store the CLI reads. Real uvicorn servers, the real
SmolLM2 model, real SQLite stores."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import openai
import pytest
from _serve_fixtures import app_server, cli_server, workspace

from agent.model import LocalEngine
from agent.serving.openai_server import build_app
from agent.workspace import trace_db_path
from traces.store import TraceStore
from traces.tracer import Tracer

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def engine(model_path):
    eng = LocalEngine(model_path, batch_wait_ms=20)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory, model_path, engine):
    cfg = workspace(tmp_path_factory.mktemp("ws"), model_path)
    cfg.workspace.ensure()
    tracer = Tracer(TraceStore(trace_db_path(cfg)))
    store = TraceStore(trace_db_path(cfg))
    with app_server(build_app(engine, tracer=tracer, store=store)) as url:
        yield url, store, cfg
    tracer.close()


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def _answer(url: str, text: str = "Say hi.", **kw):
    return _client(url).chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=8, **kw
    )


def test_an_openai_client_call_becomes_a_trace_with_token_ids(served):
    url, store, _ = served
    raw = _answer(url, "Name a colour.", user="alice")
    completion = raw.parse()
    trace_id = raw.headers["x-selftune-trace-id"]
    assert completion.id == f"chatcmpl-{trace_id}"
    assert "prompt_token_ids" not in (completion.model_extra or {})  # not asked for

    trace = store.get(trace_id)
    assert trace.status == "ok" and trace.tags == ["traffic"]
    assert trace.metadata["source"] == "serve" and trace.metadata["session_id"] == "alice"
    assert trace.metadata["client"].startswith("OpenAI/Python")
    (span,) = trace.spans
    assert span.kind == "llm"
    assert span.llm.messages == [{"role": "user", "content": "Name a colour."}]
    assert len(span.llm.prompt_token_ids) == completion.usage.prompt_tokens
    assert len(span.llm.completion_token_ids) == completion.usage.completion_tokens
    assert span.llm.sampling["max_tokens"] == 8
    assert trace.answer == completion.choices[0].message.content


def test_a_session_header_groups_calls_and_a_repeated_question_is_a_weak_label(served):
    url, store, _ = served
    ids = [
        _answer(url, q, extra_headers={"X-Selftune-Session": "s-42"}).headers["x-selftune-trace-id"]
        for q in ("Hi there.", "hi  THERE.")
    ]
    first, second = (store.get(i) for i in ids)
    assert [first.metadata["session_id"], second.metadata["session_id"]] == ["s-42", "s-42"]
    assert "weak_labels" not in first.metadata
    assert second.metadata["weak_labels"] == [
        {"signal": "repeated_question", "source": "implicit", "about": ids[0]}
    ]


def test_a_failed_tool_result_in_the_request_is_a_weak_label(served):
    url, store, _ = served
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    raw = _client(url).chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": "Use f."},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "Error: f is down"},
        ],
        max_tokens=8,
    )
    trace = store.get(raw.headers["x-selftune-trace-id"])
    assert trace.metadata["weak_labels"] == [
        {"signal": "tool_error", "source": "implicit", "tool_call_id": "c1"}
    ]
    # arguments are stored as dicts, as dataset rows need them
    assert trace.spans[0].llm.messages[1]["tool_calls"][0]["function"]["arguments"] == {}


@pytest.mark.slow
def test_a_streamed_call_is_recorded_too(served):
    url, store, _ = served
    stream = _client(url).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count to three."}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    ids = {c.id for c in chunks}
    assert len(ids) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    trace = store.get(ids.pop().removeprefix("chatcmpl-"))
    assert text == trace.answer and text
    assert chunks[-1].usage.completion_tokens == len(trace.spans[0].llm.completion_token_ids)


def test_feedback_over_http_is_in_the_store_and_in_traces_show(served):
    url, store, cfg = served
    completion = _answer(url, "What is 2 + 2?").parse()
    r = httpx.post(
        f"{url}/v1/feedback",
        json={
            "id": completion.id,
            "thumb": "down",
            "note": "wrong sum",
            "correction": "2 + 2 = 4",
            "user": "bob",
        },
    )
    assert r.status_code == 200, r.text
    trace_id = completion.id.removeprefix("chatcmpl-")
    assert r.json()["trace_id"] == trace_id
    (grade,) = store.grades(trace_id)
    assert (grade.source, grade.grader, grade.value) == ("human", "human:bob", 0.0)
    assert grade.metadata == {"via": "http", "thumb": "down", "correction": "2 + 2 = 4"}
    # the bare trace id works as well; the same person's second verdict replaces the first
    r = httpx.post(f"{url}/v1/feedback", json={"id": trace_id, "score": 0.75, "user": "bob"})
    assert r.status_code == 200, r.text
    assert [g.value for g in store.grades(trace_id)] == [0.75]

    shown = subprocess.run(
        [sys.executable, "-m", "agent.cli", "traces", "show", trace_id],
        env={**os.environ, "SELFTUNE_HOME": str(cfg.workspace.root)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert "human:bob" in shown.stdout and "0.75" in shown.stdout


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"id": "chatcmpl-nosuchtrace", "thumb": "up"}, 404, "no trace with id 'nosuchtrace'"),
        ({"id": "x", "thumb": "sideways"}, 422, "'thumb': Input should be 'up' or 'down'"),
        ({"id": "x", "score": 3}, 422, "'score': Input should be less than or equal to 1"),
        ({"id": "x", "thumbs": "up"}, 422, "'thumbs': Extra inputs are not permitted"),
        ({"thumb": "up"}, 422, "'id': Field required"),
        ({"id": "x"}, 422, "give 'thumb'"),
    ],
)
def test_bad_feedback_is_refused_naming_the_field(served, body, status, says):
    url, _, _ = served
    r = httpx.post(f"{url}/v1/feedback", json=body)
    assert r.status_code == status
    assert says in r.json()["error"]["message"]


def test_feedback_marks_a_session_private_after_the_fact_and_traffic_datasets_drop_it(
    served, tmp_path
):
    import asyncio
    import time

    from traces.feedback import build_feedback_dataset
    from tuner.traffic import select_traffic

    url, store, _ = served
    since = time.time() - 0.001
    kept = _answer(url, "Say one.", user="ivan").parse().id
    first = _answer(url, "Say two.", user="hana").parse().id
    second = _answer(url, "Say three.", user="hana").parse().id
    for id_ in (kept, first, second):
        assert httpx.post(f"{url}/v1/feedback", json={"id": id_, "thumb": "up"}).status_code == 200

    # after the fact, on one answer, with no verdict: the whole session, and who marked it
    r = httpx.post(f"{url}/v1/feedback", json={"id": first, "private": True, "user": "hana"})
    assert r.status_code == 200, r.text
    assert r.json()["private"] is True and r.json()["marked_traces"] == 2
    assert r.json()["trace_id"] == first.removeprefix("chatcmpl-")
    later = _answer(url, "Say four.", user="hana").parse().id  # still to come: private too
    ids = [i.removeprefix("chatcmpl-") for i in (kept, first, second, later)]
    marks = [store.get(i, with_spans=False).metadata for i in ids]
    assert [bool(m.get("private")) for m in marks] == [False, True, True, True]
    assert (
        marks[1]["private_marked"]["by"] == "hana" and marks[1]["private_marked"]["via"] == "http"
    )
    assert [g.value for g in store.grades(ids[1])] == [1.0]  # the thumb stays; it is not used

    sel = asyncio.run(select_traffic(store, since=since))
    assert {i.trace_id for i in sel.items} == {ids[0]}
    assert sel.excluded == {"private_session": 3}
    built = build_feedback_dataset(store, "sft", tmp_path / "sft", since=since)
    assert built.manifest["trace_ids"] == [ids[0]]

    # only true is taken; an unknown id is a 404 as for any feedback
    r = httpx.post(f"{url}/v1/feedback", json={"id": kept, "private": False})
    assert r.status_code == 422 and "'private'" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/feedback", json={"id": "chatcmpl-nosuch", "private": True})
    assert r.status_code == 404


@pytest.mark.slow
def test_a_langchain_agent_with_a_tool_is_recorded_call_by_call(served):
    from langchain.agents import create_agent
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    url, store, _ = served

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    model = ChatOpenAI(
        base_url=f"{url}/v1",
        api_key="unused",
        model=MODEL,
        max_tokens=40,
        temperature=0,
        streaming=True,
        max_retries=0,
        default_headers={"X-Selftune-Session": "langchain-run"},
    )
    graph = create_agent(model, tools=[add], system_prompt="Use the add tool for sums.")
    before = store.count(tag="traffic", limit=None)
    result = graph.invoke({"messages": [{"role": "user", "content": "What is 20 + 22?"}]})
    replies = [m for m in result["messages"] if m.type == "ai"]
    recorded = [
        t
        for t in store.query(tag="traffic", limit=None)
        if t.metadata.get("session_id") == "langchain-run"
    ]
    assert store.count(tag="traffic", limit=None) - before == len(replies) == len(recorded)
    for t in recorded:
        (span,) = store.spans(t.id)
        assert [x["function"]["name"] for x in span.llm.tools] == ["add"]
        assert span.llm.prompt_token_ids and span.llm.completion_token_ids
        assert span.llm.messages[0] == {"role": "system", "content": "Use the add tool for sums."}


@pytest.mark.slow
def test_proxy_mode_records_what_a_second_real_server_answers(tmp_path, model_path):
    upstream_home, proxy_home = tmp_path / "upstream", tmp_path / "proxy"
    workspace(upstream_home, model_path)
    proxy_home.mkdir()  # the proxy needs no model of its own
    with (
        cli_server(upstream_home, "--no-agent", log=tmp_path / "upstream.log") as upstream,
        cli_server(proxy_home, "--upstream", f"{upstream}/v1", log=tmp_path / "proxy.log") as proxy,
    ):
        raw = _answer(proxy, "Name a fruit.", user="erin", extra_body={"return_token_ids": True})
        completion = raw.parse()
        models = [m.id for m in _client(proxy).models.list()]
        streamed = list(
            _client(proxy).chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Name a city."}],
                max_tokens=8,
                stream=True,
            )
        )
    assert models == [MODEL]  # the upstream's list, passed on
    trace_id = raw.headers["x-selftune-trace-id"]
    assert completion.id == f"chatcmpl-{trace_id}"
    proxy_store = TraceStore(proxy_home / "traces.db")
    trace = proxy_store.get(trace_id)
    assert trace.metadata["upstream"] == f"{upstream}/v1"
    assert trace.metadata["session_id"] == "erin"
    assert trace.answer == completion.choices[0].message.content
    (span,) = trace.spans
    assert span.llm.prompt_token_ids == completion.model_extra["prompt_token_ids"]
    assert len(span.llm.completion_token_ids) == completion.usage.completion_tokens
    # the upstream, a selftune server too, recorded the same answer under its own id
    upstream_id = trace.metadata["upstream_id"].removeprefix("chatcmpl-")
    assert TraceStore(upstream_home / "traces.db").get(upstream_id).answer == trace.answer
    # a stream passes through as it comes and is recorded when it ends
    (stream_id,) = {c.id for c in streamed}
    streamed_trace = proxy_store.get(stream_id.removeprefix("chatcmpl-"))
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text and streamed_trace.answer == text and streamed_trace.metadata["streamed"]
    # usage is asked of the upstream for the record even though this client did not ask
    assert 0 < streamed_trace.spans[0].llm.output_tokens <= 8
    assert streamed_trace.spans[0].llm.finish_reason in ("stop", "length")


def test_an_address_other_machines_reach_needs_an_api_key(tmp_path, model_path, engine):
    workspace(tmp_path / "ws", model_path)
    r = subprocess.run(
        [sys.executable, "-m", "agent.cli", "serve", "--host", "0.0.0.0", "--port", "1"],
        env={**os.environ, "SELFTUNE_HOME": str(tmp_path / "ws")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "--api-key" in r.stderr + r.stdout
    with app_server(build_app(engine, api_key="s3cret")) as url:
        assert httpx.get(f"{url}/v1/models").status_code == 401
        ok = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and httpx.get(f"{url}/health").status_code == 200


@pytest.mark.slow
def test_feedback_on_traffic_becomes_sft_dpo_and_kto_rows_with_provenance(served, tmp_path):
    import json
    import time

    url, store, cfg = served
    since = time.time() - 0.001
    ids = {}
    for name, question in [("up", "Say yes."), ("down", "Say no."), ("fix", "What is 2 + 3?")]:
        ids[name] = _answer(url, question, user="frank").parse().id
    # a session of its own: a private request takes its whole session out (another test)
    private = _answer(url, "My secret.", user="frank-2", metadata={"private": "true"}).parse().id
    verdicts = [
        {"id": ids["up"], "thumb": "up"},
        {"id": ids["down"], "thumb": "down", "note": "rude"},
        {"id": ids["fix"], "correction": "The sum of 2 and 3 is 5."},
        {"id": private, "thumb": "up"},
    ]
    for body in verdicts:
        assert httpx.post(f"{url}/v1/feedback", json={**body, "user": "gina"}).status_code == 200
    answers = {k: store.get(v.removeprefix("chatcmpl-")).answer for k, v in ids.items()}

    def build(kind: str) -> tuple[list[dict], list[dict], dict]:
        out = tmp_path / kind
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "agent.cli",
                "dataset",
                "traffic",
                kind,
                "--since",
                str(since),
                "--out",
                str(out),
            ],
            env={**os.environ, "SELFTUNE_HOME": str(cfg.workspace.root)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        rows = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
        prov = json.loads((out / "provenance.json").read_text())
        return rows, prov, json.loads((out / "manifest.json").read_text())

    sft, prov, manifest = build("sft")
    assert manifest["excluded"] == {"private": 1, "thumbs_down": 1}
    finals = sorted(r["messages"][-1]["content"] for r in sft)
    assert finals == sorted([answers["up"], "The sum of 2 and 3 is 5."])
    assert {p["signal"] for p in prov} == {"thumb_up", "correction"}
    assert all(p["who"] == "gina" and p["via"] == "http" and p["when"] >= since for p in prov)

    (dpo,), (p,), _ = build("dpo")
    assert dpo["prompt"][-1] == {"role": "user", "content": "What is 2 + 3?"}
    assert dpo["chosen"] == [{"role": "assistant", "content": "The sum of 2 and 3 is 5."}]
    assert dpo["rejected"][0]["content"] == answers["fix"]
    assert p["trace_id"] == ids["fix"].removeprefix("chatcmpl-")

    kto, prov, _ = build("kto")
    labels = sorted((p["signal"], r["label"]) for r, p in zip(kto, prov, strict=True))
    assert labels == sorted(
        [
            ("correction", True),
            ("corrected_original", False),
            ("thumb_down", False),
            ("thumb_up", True),
        ]
    )


def test_a_tool_call_answer_streams_as_valid_openai_chunks():
    """Unit: the chunks of an answer with a tool call parse as the openai package's own chunk
    type, and the upstream-shaped answer fills a span with the call written as our template
    writes it."""
    from openai.types.chat import ChatCompletionChunk

    from agent.serving.openai_server import completion_chunks
    from agent.serving.recording import fill_span
    from traces.schemas import LlmData, Span

    call = {"id": "c9", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    out = {
        "id": "chatcmpl-t1",
        "model": "teacher",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Adding.", "tool_calls": [call]},
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }
    chunks = [ChatCompletionChunk.model_validate(c) for c in completion_chunks(out, True)]
    (delta,) = [
        c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls
    ]
    assert (delta[0].index, delta[0].id, delta[0].function.name) == (0, "c9", "add")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage.total_tokens == 8

    span = Span(trace_id="t1", kind="llm", name="chat", llm=LlmData(messages=[]))
    assert fill_span(span, out) == "Adding."
    assert (
        span.llm.completion
        == 'Adding.\n<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'
    )
    assert span.llm.tool_calls[0].arguments == {"a": 1}
    assert (span.llm.input_tokens, span.llm.finish_reason) == (5, "tool_calls")
