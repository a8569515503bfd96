"""The orchestrator agent served as `selftune-agent` over the chat-completions protocol: a real
uvicorn server, the real SmolLM2 model and agent (calculator tool, SQLite checkpoints), a real
trace store, and the official `openai` client."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from _serve_fixtures import app_server, workspace

from agent.agent import Agent
from agent.model import LocalEngine
from agent.serving.agent_service import AGENT_MODEL, AgentService
from agent.serving.openai_server import build_app
from agent.workspace import trace_db_path
from traces.store import TraceStore
from traces.tracer import Tracer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory, model_path):
    cfg = workspace(tmp_path_factory.mktemp("ws"), model_path)
    cfg.workspace.ensure()
    engine = LocalEngine(model_path, batch_wait_ms=20)
    tracer = Tracer(TraceStore(trace_db_path(cfg)))
    store = TraceStore(trace_db_path(cfg))
    service = AgentService(Agent(cfg, engine=engine, tracer=tracer))
    app = build_app(engine, agent=service, tracer=tracer, store=store)
    with app_server(app) as url:
        yield url, store
    tracer.close()
    engine.close()


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_the_agent_answers_and_the_completion_id_is_its_trace(served):
    url, store = served
    raw = _client(url).chat.completions.with_raw_response.create(
        model=AGENT_MODEL,
        messages=[{"role": "user", "content": "What is 48 * 97?"}],
        max_tokens=48,
        user="carol",
    )
    completion = raw.parse()
    trace_id = raw.headers["x-selftune-trace-id"]
    assert completion.id == f"chatcmpl-{trace_id}"
    assert completion.model_extra["trace_id"] == trace_id
    assert completion.choices[0].finish_reason in ("stop", "length")

    trace = store.get(trace_id)
    assert trace.answer == completion.choices[0].message.content
    assert "traffic" in trace.tags and trace.metadata["session_id"] == "carol"
    assert any(s.kind == "agent" and s.name == "orchestrator" for s in trace.spans)
    llms = [s.llm for s in trace.spans if s.kind == "llm"]
    assert llms and all(x.prompt_token_ids and x.completion_token_ids for x in llms)
    # the agent offered its own tool, and the usage adds up its model calls
    assert llms[0].tools[0]["function"]["name"] == "calculator"
    assert completion.usage.prompt_tokens == sum(x.input_tokens for x in llms)
    assert completion.usage.completion_tokens == sum(x.output_tokens for x in llms)


def test_the_agent_streams_server_sent_events(served):
    url, store = served
    body = {
        "model": AGENT_MODEL,
        "messages": [{"role": "user", "content": "Say hello to Dana."}],
        "max_tokens": 24,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        trace_id = r.headers["x-selftune-trace-id"]
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["id"] for c in chunks} == {f"chatcmpl-{trace_id}"}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    *with_choice, usage = chunks
    finals = [c for c in with_choice if c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0] is with_choice[-1]
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] > 0
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in with_choice)
    assert text == store.get(trace_id).answer and text.strip()


def test_a_conversation_continues_by_its_id(served):
    url, store = served
    client = _client(url)
    first = client.chat.completions.with_raw_response.create(
        model=AGENT_MODEL,
        messages=[{"role": "user", "content": "My name is Zelda."}],
        max_tokens=24,
        extra_headers={"X-Selftune-Conversation": "conv-zelda"},
    )
    assert first.headers["x-selftune-conversation"] == "conv-zelda"
    answer1 = first.parse().choices[0].message.content
    # the second turn names the conversation in metadata and sends only the new message,
    # streamed through the openai client
    stream = client.chat.completions.create(
        model=AGENT_MODEL,
        messages=[{"role": "user", "content": "What is my name?"}],
        max_tokens=24,
        metadata={"conversation_id": "conv-zelda"},
        stream=True,
    )
    chunks = list(stream)
    second_id = chunks[0].id.removeprefix("chatcmpl-")
    assert chunks[-1].choices[0].finish_reason == "stop"
    sent = [s.llm.messages for s in store.get(second_id).spans if s.kind == "llm"][0]
    users = [m["content"] for m in sent if m["role"] == "user"]
    assert users == ["My name is Zelda.", "What is my name?"]
    assert {"role": "assistant", "content": answer1} in [
        {"role": m["role"], "content": m["content"]} for m in sent
    ]
    assert store.get(second_id).metadata["session_id"] == "conv-zelda"


def test_a_stateless_request_brings_its_history(served):
    url, store = served
    raw = _client(url).chat.completions.with_raw_response.create(
        model=AGENT_MODEL,
        messages=[
            {"role": "system", "content": "Answer in one short sentence."},
            {"role": "user", "content": "I live in Oslo."},
            {"role": "assistant", "content": "Nice, Oslo is lovely."},
            {"role": "user", "content": "Where do I live?"},
        ],
        max_tokens=24,
    )
    trace = store.get(raw.headers["x-selftune-trace-id"])
    sent = [s.llm.messages for s in trace.spans if s.kind == "llm"][0]
    assert sent[0]["role"] == "system" and sent[0]["content"].endswith(
        "Answer in one short sentence."
    )
    assert [m["content"] for m in sent[1:4]] == [
        "I live in Oslo.",
        "Nice, Oslo is lovely.",
        "Where do I live?",
    ]


def test_the_agent_refuses_client_tools_and_a_last_turn_not_the_users(served):
    url, _ = served
    client = _client(url)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError, match="'tools'"):
        client.chat.completions.create(
            model=AGENT_MODEL, messages=[{"role": "user", "content": "hi"}], tools=[tool]
        )
    with pytest.raises(openai.BadRequestError, match="last message must be the user's"):
        client.chat.completions.create(
            model=AGENT_MODEL, messages=[{"role": "assistant", "content": "hi"}]
        )


def test_models_lists_the_agent_and_the_raw_model(served):
    url, _ = served
    ids = [m.id for m in _client(url).models.list()]
    assert ids == ["smollm2-135m-instruct", AGENT_MODEL]
