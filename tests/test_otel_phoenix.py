"""A stored trace pushed with `selftune traces push` into a real Arize Phoenix, read back through
Phoenix's own client: the spans, their tree, the LLM input and output text, the token counts,
the conversation and the grades must all be there.

Phoenix lives in a venv of its own under the workspace cache (`.selftune/engines/phoenix`,
~850 MB, a few minutes to make on first use, reused after), since it pins packages of its own.
It serves on loopback ports of its own, with a temporary working dir and telemetry off. Where
the venv cannot be made (no package index) or Phoenix does not start, the test skips and says
why.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from _traces_fixtures import ADD, make_trace
from typer.testing import CliRunner

from agent.cli.traces import traces_app
from traces.otel import otel_span_id, otlp_sink_from_config, root_span_id
from traces.schemas import Grade, LlmData, TracesConfig
from traces.store import TraceStore
from traces.tracer import Tracer

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
PACKAGES = ["arize-phoenix", "arize-phoenix-client"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


@pytest.fixture(scope="module")
def phoenix_python() -> Path:
    """The Phoenix venv's python, made on first use (in a `.partial` folder, renamed when
    complete, so an interrupted install is never taken for a finished one)."""
    root = REPO / ".selftune" / "engines" / "phoenix"
    python = root / "bin" / "python"
    if (root / ".ready").exists():
        return python
    partial = root.with_name("phoenix.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    steps = [
        [sys.executable, "-m", "venv", str(partial)],
        [str(partial / "bin" / "python"), "-m", "pip", "install", "-q",
         "--disable-pip-version-check", *PACKAGES],
    ]  # fmt: skip
    for argv in steps:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
        if p.returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            pytest.skip(f"cannot make Phoenix's venv ({' '.join(argv[-2:])}): {_tail(p.stderr)}")
    (partial / ".ready").write_text(" ".join(PACKAGES) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    partial.rename(root)
    return python


@pytest.fixture(scope="module")
def phoenix(phoenix_python: Path, tmp_path_factory):
    """A Phoenix server on 127.0.0.1; yields its base URL."""
    work = tmp_path_factory.mktemp("phoenix")
    port = _free_port()
    env = dict(os.environ)
    env.update(
        PHOENIX_WORKING_DIR=str(work),
        PHOENIX_HOST="127.0.0.1",
        PHOENIX_PORT=str(port),
        PHOENIX_GRPC_PORT=str(_free_port()),
        PHOENIX_TELEMETRY_ENABLED="false",
    )
    for var in [k for k in env if k.startswith("OTEL_")]:
        del env[var]  # a collector configured for this shell must not catch Phoenix's own spans
    log = (work / "server.log").open("w")
    proc = subprocess.Popen(
        [str(phoenix_python), "-m", "phoenix.server.main", "serve"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    try:
        while True:
            if proc.poll() is not None:
                pytest.skip(f"Phoenix exited with {proc.returncode}: "
                            f"{_tail((work / 'server.log').read_text())}")  # fmt: skip
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"Phoenix did not answer in 240 s: "
                            f"{_tail((work / 'server.log').read_text())}")  # fmt: skip
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


_QUERY = """
import json, sys
from phoenix.client import Client
df = Client(base_url=sys.argv[1]).spans.get_spans_dataframe(project_identifier="default")
print(df.reset_index(drop=True).to_json(orient="records", date_format="iso", default_handler=str))
"""


def _spans(python: Path, url: str, trace_id: str, want: int, timeout_s: float = 60) -> list[dict]:
    """One trace's spans in Phoenix, through its client, once `want` of them are in (ingestion
    is asynchronous)."""
    deadline = time.monotonic() + timeout_s
    while True:
        p = subprocess.run([str(python), "-c", _QUERY, url], capture_output=True, text=True,
                           timeout=120)  # fmt: skip
        assert p.returncode == 0, p.stderr
        rows = [r for r in json.loads(p.stdout or "[]") if r["context.trace_id"] == trace_id]
        if len(rows) >= want or time.monotonic() > deadline:
            return rows
        time.sleep(1)


def test_a_pushed_trace_displays_fully_in_phoenix(phoenix, phoenix_python, tmp_path, monkeypatch):
    for var in [k for k in os.environ if k.startswith("OTEL_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("SELFTUNE_HOME", str(tmp_path / "ws"))
    monkeypatch.chdir(tmp_path)  # no stray ./selftune.toml
    t = make_trace(calls=[ADD], env="calc", metadata={"thread_id": "thread-42"})
    agent, llm, tool, retrieval = t.spans
    agent.attributes["task"] = "what is 2+3?"
    llm.llm.messages = [
        {"role": "system", "content": "You are a calculator."},
        {"role": "user", "content": "what is 2+3?"},
    ]
    store = TraceStore(tmp_path / "ws" / "traces.db")
    store.save(t)
    store.add_grade(Grade(trace_id=t.id, value=1.0, source="verifier", grader="numeric",
                          reason="5 == 5"))  # fmt: skip
    store.close()

    res = CliRunner().invoke(traces_app, ["push", "--endpoint", phoenix], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "sent 5 OTel spans" in res.output

    rows = _spans(phoenix_python, phoenix, t.id, want=5)
    by_id = {r["context.span_id"]: r for r in rows}
    ours = {otel_span_id(s.id): s for s in t.spans}
    assert set(by_id) == set(ours) | {root_span_id(t.id)}
    assert {r["context.trace_id"] for r in rows} == {t.id}

    # the tree: the episode's root, then our spans under their parents
    root = by_id[root_span_id(t.id)]
    assert root["parent_id"] in (None, "") and root["name"] == "invoke_agent calc"
    for sid, s in ours.items():
        want = otel_span_id(s.parent_id) if s.parent_id else root_span_id(t.id)
        assert by_id[sid]["parent_id"] == want, s.name

    kinds = {sid: r["span_kind"] for sid, r in by_id.items()}
    assert kinds[otel_span_id(llm.id)] == "LLM" and kinds[otel_span_id(tool.id)] == "TOOL"
    assert kinds[otel_span_id(retrieval.id)] == "RETRIEVER" and kinds[root_span_id(t.id)] == "AGENT"

    # the LLM's input messages, output and tokens as Phoenix shows them
    chat = by_id[otel_span_id(llm.id)]
    inputs = chat["attributes.llm.input_messages"]
    assert [m["message.role"] for m in inputs] == ["system", "user"]
    assert inputs[1]["message.content"] == "what is 2+3?"
    outputs = chat["attributes.llm.output_messages"]
    assert outputs[0]["message.role"] == "assistant"
    assert outputs[0]["message.content"] == llm.llm.completion
    assert "what is 2+3?" in chat["attributes.input.value"]
    assert chat["attributes.output.value"] == llm.llm.completion
    assert chat["attributes.llm.token_count.prompt"] == 40
    assert chat["attributes.llm.token_count.completion"] == 12
    assert chat["attributes.llm.token_count.total"] == 52

    # the episode's own input and output (the trace list's columns), its thread, its grade
    assert root["attributes.input.value"] == "what is 2+3?"
    assert root["attributes.output.value"] == "5"
    assert root["attributes.session.id"] == "thread-42"
    events = root["events"]
    assert [e["name"] for e in events] == ["gen_ai.evaluation.result"]
    assert events[0]["attributes"]["gen_ai.evaluation.score.value"] == 1.0

    docs = by_id[otel_span_id(retrieval.id)]["attributes.retrieval.documents"]
    assert docs[0]["document.id"] == "d1" and docs[0]["document.score"] == 0.9
    assert docs[0]["document.content"] == "addition adds"


def test_live_export_displays_in_phoenix(phoenix, phoenix_python, tmp_path):
    sink = otlp_sink_from_config(TracesConfig(otlp_endpoint=phoenix))
    assert sink is not None
    store = TraceStore(tmp_path / "traces.db")
    tracer = Tracer(store, [sink])
    with tracer.trace(env="calc", model="smollm2", metadata={"thread_id": "live-1"}) as t:
        with tracer.span("agent", "orchestrator") as agent:
            agent.attributes["task"] = "what is 6*7?"
            with tracer.span(
                "llm", "chat",
                llm=LlmData(messages=[{"role": "user", "content": "what is 6*7?"}],
                            input_tokens=9, output_tokens=2),
            ) as s:  # fmt: skip
                s.llm.completion = "42"
        t.answer = "42"
    tracer.close()  # shuts the sink down, which posts what is queued
    store.close()

    rows = {r["name"]: r for r in _spans(phoenix_python, phoenix, t.id, want=3)}
    assert set(rows) == {"invoke_agent calc", "invoke_agent orchestrator", "chat smollm2"}
    root, agent_row, chat = (rows[n] for n in ("invoke_agent calc", "invoke_agent orchestrator",
                                               "chat smollm2"))  # fmt: skip
    assert chat["parent_id"] == agent_row["context.span_id"]
    assert agent_row["parent_id"] == root["context.span_id"]
    assert chat["attributes.llm.input_messages"][0]["message.content"] == "what is 6*7?"
    assert chat["attributes.llm.output_messages"][0]["message.content"] == "42"
    assert chat["attributes.llm.token_count.total"] == 11
    assert root["attributes.input.value"] == "what is 6*7?"
    assert root["attributes.output.value"] == "42"
    assert root["attributes.session.id"] == "live-1"
