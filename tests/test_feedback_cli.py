"""`selftune feedback` takes what `POST /v1/feedback` takes: a verdict, a score, a correction
and `--private`, on a trace id, a prefix or the response id a chat completion returned. Real
parts: the real SmolLM2 answering under uvicorn on loopback (recording into a real SQLite
store), the real `selftune` app under typer's CliRunner, and `selftune dataset traffic` reading
what the CLI wrote."""

from __future__ import annotations

import json
import time
from pathlib import Path

import openai
import pytest
from _serve_fixtures import app_server, workspace
from typer.testing import CliRunner

from agent.cli import app
from agent.model import LocalEngine
from agent.serving.openai_server import build_app
from agent.workspace import trace_db_path
from traces.store import TraceStore
from traces.tracer import Tracer

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def traffic(tmp_path_factory, model_path):
    """Six answers of the real model in three sessions, recorded by the real server: response
    ids by name, the store, the workspace root, and when the traffic began."""
    cfg = workspace(tmp_path_factory.mktemp("ws"), model_path)
    cfg.workspace.ensure()
    engine = LocalEngine(model_path, batch_wait_ms=20)
    tracer = Tracer(TraceStore(trace_db_path(cfg)))
    store = TraceStore(trace_db_path(cfg))
    since = time.time() - 0.001
    asked = [
        ("ana-1", "ana", "Say one."),
        ("ana-2", "ana", "Say two."),
        ("ben-1", "ben", "What is 2 + 3?"),
        ("ben-2", "ben", "Say yes."),
        ("cy-1", "cy", "Say no."),
        ("cy-2", "cy", "Name a colour."),
    ]
    ids = {}
    try:
        with app_server(build_app(engine, tracer=tracer, store=store)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            for name, user, question in asked:
                ids[name] = client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": question}],
                    max_tokens=8,
                    user=user,
                ).id
        yield ids, store, cfg.workspace.root, since
    finally:
        tracer.close()
        engine.close()


def _cli(home: Path, *args: str):
    return CliRunner().invoke(app, list(args), env={"SELFTUNE_HOME": str(home)})


def _dataset(home: Path, kind: str, since: float, out: Path) -> tuple[list[dict], dict]:
    done = _cli(home, "dataset", "traffic", kind, "--since", str(since), "--out", str(out))
    assert done.exit_code == 0, done.output
    rows = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "manifest.json").read_text())


def test_feedback_takes_response_ids_scores_and_corrections_and_a_correction_is_a_dpo_pair(
    traffic, tmp_path
):
    ids, store, home, since = traffic
    ben1 = ids["ben-1"].removeprefix("chatcmpl-")
    original = store.get(ben1).answer

    # a response id, as the chat completion returned it
    done = _cli(home, "feedback", ids["ben-2"], "up", "--who", "ada")
    assert done.exit_code == 0, done.output
    assert "recorded up" in done.output
    (grade,) = store.grades(ids["ben-2"].removeprefix("chatcmpl-"))
    assert (grade.grader, grade.value, grade.metadata["via"]) == ("human:ada", 1.0, "cli")

    # a correction alone (no verdict), on a trace id prefix
    done = _cli(
        home, "feedback", ben1[:12], "--correction", "The sum of 2 and 3 is 5.", "--who", "ada"
    )
    assert done.exit_code == 0, done.output
    (grade,) = store.grades(ben1)
    assert grade.value == 0.0 and grade.metadata["correction"] == "The sum of 2 and 3 is 5."

    # a score alone
    cy2 = ids["cy-2"].removeprefix("chatcmpl-")
    done = _cli(home, "feedback", ids["cy-2"], "--score", "0.75", "--who", "bo", "--note", "ok")
    assert done.exit_code == 0, done.output
    (grade,) = store.grades(cy2)
    assert (grade.value, grade.reason, grade.metadata["score"]) == (0.75, "ok", 0.75)

    rows, manifest = _dataset(home, "dpo", since, tmp_path / "dpo")
    assert manifest["trace_ids"] == [ben1]
    (row,) = rows
    assert row["prompt"][-1] == {"role": "user", "content": "What is 2 + 3?"}
    assert row["chosen"][-1]["content"] == "The sum of 2 and 3 is 5."
    assert row["rejected"][-1]["content"] == original
    prov = json.loads((tmp_path / "dpo" / "provenance.json").read_text())
    assert [(p["signal"], p["who"], p["via"]) for p in prov] == [("correction", "ada", "cli")]
    rows, _ = _dataset(home, "sft", since, tmp_path / "sft")
    finals = sorted(r["messages"][-1]["content"] for r in rows)
    assert "The sum of 2 and 3 is 5." in finals and original not in finals


def test_private_marks_the_whole_session_and_dataset_traffic_leaves_it_out(traffic, tmp_path):
    ids, store, home, since = traffic
    ana1, ana2, cy1 = (ids[k].removeprefix("chatcmpl-") for k in ("ana-1", "ana-2", "cy-1"))
    for id_ in (ana1, ana2, cy1):
        assert _cli(home, "feedback", id_, "up", "--who", "ada").exit_code == 0
    rows, manifest = _dataset(home, "sft", since, tmp_path / "before")
    assert {ana1, ana2, cy1} <= set(manifest["trace_ids"])

    # a bad score refuses the whole feedback: nothing is marked
    done = _cli(home, "feedback", ids["ana-1"], "--private", "--score", "3")
    assert done.exit_code == 1 and "outside [0, 1]" in done.output
    assert not store.get(ana1, with_spans=False).metadata.get("private")

    # --private with no verdict, on one answer's response id: the session's every trace
    done = _cli(home, "feedback", ids["ana-1"], "--private", "--who", "ana")
    assert done.exit_code == 0, done.output
    assert "marked session ana private: 2 traces" in done.output
    marks = [store.get(i, with_spans=False).metadata for i in (ana1, ana2, cy1)]
    assert [bool(m.get("private")) for m in marks] == [True, True, False]
    assert marks[1]["private_marked"]["by"] == "ana" and marks[1]["private_marked"]["via"] == "cli"
    assert [g.value for g in store.grades(ana1)] == [1.0]  # the thumb stays, unused

    rows, manifest = _dataset(home, "sft", since, tmp_path / "after")
    assert ana1 not in manifest["trace_ids"] and ana2 not in manifest["trace_ids"]
    assert cy1 in manifest["trace_ids"]
    assert manifest["excluded"]["private"] == 2

    # with a verdict too: the session is marked (again) and the verdict recorded
    done = _cli(home, "feedback", ids["cy-1"], "down", "--private", "--who", "cy")
    assert done.exit_code == 0, done.output
    assert store.get(cy1, with_spans=False).metadata["private"] is True
    assert {g.grader: g.value for g in store.grades(cy1)}["human:cy"] == 0.0


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ((), "give a verdict (up or down), --score, --correction or --private"),
        (("sideways",), "verdict must be 'up' or 'down'"),
        (("--score", "-0.5"), "outside [0, 1]"),
    ],
)
def test_feedback_that_says_nothing_usable_is_refused(traffic, args, says):
    ids, store, home, _ = traffic
    done = _cli(home, "feedback", ids["cy-2"], *args)
    assert done.exit_code == 1 and says in done.output


def test_an_unknown_response_id_is_refused_naming_it(traffic):
    _, _, home, _ = traffic
    done = _cli(home, "feedback", "chatcmpl-nosuchtrace", "--private")
    assert done.exit_code == 1 and "no trace with id 'nosuchtrace'" in done.output
