"""`selftune traces ...` through typer's CliRunner, on a real store in tmp_path."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from _traces_fixtures import ADD, make_trace
from typer.testing import CliRunner

from agent.cli.traces import traces_app
from traces.schemas import Grade
from traces.store import TraceStore

runner = CliRunner()


@pytest.fixture
def home(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("SELFTUNE_HOME", str(tmp_path / "ws"))
    monkeypatch.chdir(tmp_path)  # no stray ./selftune.toml
    store = TraceStore(tmp_path / "ws" / "traces.db")
    old = make_trace(
        calls=[ADD, ADD], env="calc", task_id="old-task", start=time.time() - 40 * 86400
    )
    ok = make_trace(calls=[ADD, ADD], env="calc", task_id="t-ok", adapter="v1", tags=["run:a"])
    bad = make_trace(calls=[ADD, ADD], env="web", task_id="t-bad")
    bad.status, bad.error = "error", "ValueError: boom"
    bad.spans[1].llm.completion = "my key sk-abcdefghijklmnopqrstuvwxyz0123"
    for t in (old, ok, bad):
        store.save(t)
    store.add_grade(Grade(trace_id=ok.id, value=1.0, source="verifier", grader="numeric"))
    store.add_grade(Grade(trace_id=bad.id, value=0.0, source="verifier", grader="numeric"))
    store.close()
    return tmp_path, {"old": old, "ok": ok, "bad": bad}


def run(*args: str, obj=None, input: str | None = None):
    return runner.invoke(traces_app, list(args), obj=obj, input=input, terminal_width=200)


def test_list_filters(home):
    _, t = home
    res = run("list")
    assert res.exit_code == 0, res.output
    assert all(t[k].id[:10] in res.output for k in t)
    assert res.output.index(t["bad"].id[:10]) < res.output.index(t["old"].id[:10])  # newest first
    res = run("list", "--env", "calc", "--since", "7d")
    assert t["ok"].id[:10] in res.output and t["old"].id[:10] not in res.output
    assert t["bad"].id[:10] not in res.output
    res = run("list", "--min-grade", "0.5")
    assert t["ok"].id[:10] in res.output and t["bad"].id[:10] not in res.output
    res = run("list", "--tag", "run:a", "--adapter", "v1", "--status", "ok")
    assert "1 traces" in res.output
    res = run("list", "--since", "yesterday")
    assert res.exit_code != 0 and "neither a duration" in res.output


def test_show_prints_the_span_tree_by_prefix(home):
    _, t = home
    res = run("show", t["bad"].id[:8])
    assert res.exit_code == 0, res.output
    out = res.output
    for text in ("agent orchestrator", "llm chat", "tokens 40→12", "tool calculator", "→ 5",
                 "retrieval search", "ValueError: boom", "ms"):  # fmt: skip
        assert text in out
    res = run("show", "ffffffff")
    assert res.exit_code == 1 and "no trace with id" in res.output


def test_export_jsonl_and_otel_json_are_scrubbed(home):
    tmp, t = home
    out = tmp / "out.jsonl"
    res = run("export", "--format", "jsonl", "--env", "web", str(out))
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [t["bad"].id]
    assert rows[0]["grades"][0]["grader"] == "numeric" and len(rows[0]["spans"]) == 5
    assert "sk-abc" not in out.read_text() and "[REDACTED:openai_key]" in out.read_text()
    otel = tmp / "otel.json"
    res = run("export", "--format", "otel-json", str(otel))
    assert res.exit_code == 0, res.output
    spans = json.loads(otel.read_text())["resourceSpans"][0]["scopeSpans"][0]["spans"]
    assert len(spans) == 3 * 6 and "sk-abc" not in otel.read_text()
    res = run("export", "--format", "csv", str(out))
    assert res.exit_code != 0 and "jsonl or otel-json" in res.output


def test_stats_and_prune(home):
    tmp, t = home
    res = run("stats")
    assert res.exit_code == 0, res.output
    assert "calc" in res.output and "web" in res.output and "100%" in res.output
    res = run("prune", "--older-than", "30d", "--yes")
    assert res.exit_code == 0 and "deleted 1 traces" in res.output
    res = run("prune", "--env", "web", input="n\n")
    assert res.exit_code == 1
    res = run("prune", "--env", "web", input="y\n")
    assert "deleted 1 traces" in res.output
    with TraceStore(tmp / "ws" / "traces.db") as store:
        assert [x.id for x in store.query()] == [t["ok"].id]
    assert run("prune").exit_code != 0


def test_config_from_ctx_obj_and_missing_store(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SELFTUNE_HOME", raising=False)
    cfg = tmp_path / "my.toml"
    db = tmp_path / "elsewhere" / "t.db"
    cfg.write_text(f'[traces]\ndb = "{db}"\n')
    res = run("list", obj={"config": str(cfg)})
    assert res.exit_code == 1 and str(db) in res.output and "no trace store" in res.output
    with TraceStore(db) as store:
        store.save(make_trace(env="cfgenv"))
    res = run("stats", obj={"config": str(cfg)})
    assert res.exit_code == 0 and "cfgenv" in res.output


def test_list_json_is_one_object_per_trace_with_its_grades(home):
    _, t = home
    r = run("list", "--env", "calc", "--json")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.output.splitlines()]
    assert {row["task_id"] for row in rows} == {"old-task", "t-ok"}
    ok = next(row for row in rows if row["id"] == t["ok"].id)
    assert ok["adapter"] == "v1" and ok["grades"][0]["grader"] == "numeric"
