"""`selftune improve --source traffic` end to end with real parts: the server (real uvicorn, the
real SmolLM2, a real SQLite store) is asked calculator train questions through the official
`openai` client, the first as `selftune-agent` (the agent with the calculator tool), the rest
of the raw model (one model call each: an agent episode takes ~40 s on a loaded 2-core CPU); thumbs are given over
HTTP by comparing each answer with the reference, wrong answers get corrections, one session is
private; then one traffic cycle trains a candidate and gates it on the held-out test split plus
the held-out slice of the traffic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from _serve_fixtures import app_server

from agent.agent import Agent
from agent.envs import load_environment
from agent.model import LocalEngine
from agent.serving.agent_service import AGENT_MODEL, AgentService
from agent.serving.openai_server import build_app
from agent.workspace import trace_db_path
from traces.graders import grade_numeric
from traces.store import TraceStore
from traces.tracer import Tracer
from tuner.improve import JobState
from tuner.registry import Registry
from tuner.traffic import in_heldout

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = 20  # 2 per session: 10 sessions, 3 of them held out, 1 private
MODEL = "smollm2-135m-instruct"


def _sessions() -> tuple[list[str], list[str]]:
    names = [f"user-{i}" for i in range(100)]
    train = [s for s in names if not in_heldout(s, 0.2)][:7]
    held = [s for s in names if in_heldout(s, 0.2)][:3]
    return train, held


def _ask_and_give_feedback(cfg, model_path) -> dict[str, list[str]]:
    """The scripted user: returns trace ids by what was done with them."""
    tasks = load_environment("calculator", config=cfg.agent).split("train")[:QUESTIONS]
    train, held = _sessions()
    sessions = [*train, *held]
    private = train[-1]
    engine = LocalEngine(model_path, batch_wait_ms=20)
    tracer = Tracer(TraceStore(trace_db_path(cfg)))
    store = TraceStore(trace_db_path(cfg))
    service = AgentService(Agent(cfg, engine=engine, tracer=tracer))
    done: dict[str, list[str]] = {"up": [], "down": [], "correction": [], "none": [], "private": []}
    try:
        with app_server(build_app(engine, agent=service, tracer=tracer, store=store)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            for i, task in enumerate(tasks):
                session = sessions[i // 2]
                headers = {"X-Selftune-Private": "1"} if session == private else {}
                completion = client.chat.completions.create(
                    model=AGENT_MODEL if i == 0 else MODEL,
                    messages=[{"role": "user", "content": task.prompt}],
                    max_tokens=32,
                    user=session,
                    extra_headers=headers,
                )
                answer = completion.choices[0].message.content or ""
                trace_id = completion.id.removeprefix("chatcmpl-")
                right = grade_numeric(answer, task.answer, task.metadata).score >= 1.0
                if session == private:
                    body, kind = {"thumb": "up" if right else "down"}, "private"
                elif i % 3 == 2:  # no feedback: the environment's verifier grades it
                    body, kind = None, "none"
                elif right:
                    body, kind = {"thumb": "up"}, "up"
                elif i % 3 == 0:
                    body, kind = {"thumb": "down", "correction": f"{task.answer:g}"}, "correction"
                else:
                    body, kind = {"thumb": "down"}, "down"
                if body is not None:
                    r = httpx.post(f"{url}/v1/feedback", json={"id": completion.id, **body})
                    assert r.status_code == 200, r.text
                done[kind].append(trace_id)
    finally:
        tracer.close()
        store.close()
        engine.close()
    return done


@pytest.mark.slow
@pytest.mark.timeout(2400)  # 170 s on an idle 2-core machine; 40 min at load 4-7
def test_a_traffic_cycle_trains_on_feedback_and_gates_on_a_held_out_slice(cfg, cli_env, model_path):
    done = _ask_and_give_feedback(cfg, model_path)
    if not done["correction"]:
        pytest.skip("the base model answered every corrected-slot question right")
    env = dict(
        cli_env,
        SELFTUNE_IMPROVE__MIN_NEW_TRACES="2",
        # every model call short: the baselines' and the gate's episodes rambled to 256 tokens
        SELFTUNE_MODEL__MAX_NEW_TOKENS="32",
        SELFTUNE_TUNER__GATE__PROBE="",
        SELFTUNE_TUNER__GATE__ROBUSTNESS="[]",
    )
    args = ["improve", "calculator", "--source", "traffic", "--since", "1d", "--eval-limit", "2",
            "--max-train-steps", "2", "--max-tokens", "32", "--concurrency", "8", "--fresh"]  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=2300,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    check_cycle(cfg.workspace.root, done["private"])


def check_cycle(home: Path, private: list[str]) -> None:
    """What one finished traffic cycle in workspace `home` must show."""
    (state_file,) = home.glob("jobs/improve-*/state.json")
    cycle = JobState.load(state_file).cycles[0]
    assert cycle.skipped is None and cycle.candidate, cycle.skipped

    # the selection: private session out, the rest split by session
    traffic = cycle.traffic
    assert traffic["excluded"].get("private_session") == 2
    _, held = _sessions()
    assert set(traffic["heldout_sessions"]) == set(held)
    heldout_ids = {i["trace_id"] for i in traffic["items"] if i["heldout"]}
    assert traffic["graded_by"].get("verifier", 0) >= 1  # the no-feedback questions matched tasks

    # the dataset: rows only from training sessions, with provenance; corrections present
    out = Path(cycle.dataset["dir"])
    provenance = json.loads((out / "provenance.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    used = {p["trace_id"] for p in provenance} | set(manifest["trace_ids"])
    assert not used & heldout_ids
    assert not {p["session_id"] for p in provenance} & set(held)
    assert not used & set(private)
    rows = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert len(rows) == cycle.dataset["rows"] == len(provenance)
    # replay: every corrected training question was played again; each is a calculator task
    # (it needs the tool), so it enters the dataset only as an episode that called the tool,
    # never as the bare correction
    items = {i["trace_id"]: i for i in traffic["items"]}
    corrected = [
        i for i in items.values() if i["reference_from"] == "correction" and not i["heldout"]
    ]
    assert corrected and all(i["replayed"] and i["needs_tools"] for i in corrected)
    assert traffic["replay"]["questions"] >= len(corrected)
    assert "correction" not in cycle.dataset["rows_by_signal"]
    for row, p in zip(rows, provenance, strict=True):
        if p["signal"].startswith("replayed:"):
            assert items[p["trace_id"]]["replay"] == p["replay_trace_id"]
            assert any(m.get("tool_calls") for m in row["messages"]), row

    # the gate: a decision in the registry, on the test split and the held-out traffic
    rec = Registry(home / "adapters").get(cycle.candidate)
    gate = rec.eval_results[-1]
    assert gate["gate"]["candidate"] == cycle.candidate
    envs = {r["env"] for r in gate["candidate"]}
    assert gate["traffic"]["heldout_sessions"] == traffic["heldout_sessions"]
    # every question is a calculator task: each held-out one is replayed against its reference
    assert gate["traffic"]["heldout_tasks"] == len(heldout_ids) == cycle.traffic["gate"]["n"]
    assert envs == {"calculator", "traffic-heldout"}
    assert 0.0 <= cycle.traffic["gate"]["candidate"] <= 1.0
    assert rec.status == ("active" if gate["gate"]["promote"] else "rejected")


@pytest.mark.slow
def test_a_traffic_cycle_has_the_real_judge_grade_what_matches_no_task(cfg):
    """`[improve] judge`: the collect step hands the LLM judge (the real SmolLM2, as
    agent.workspace.judge_model makes it) the traffic no person and no verifier grades."""
    import asyncio

    from _traces_fixtures import served_trace

    from tuner.improve import CycleState, ImproveJob

    cfg.workspace.ensure()
    task = load_environment("calculator", config=cfg.agent).split("train")[0]
    store = TraceStore(trace_db_path(cfg))
    matched = served_trace(store, task.prompt, f"{task.answer:g}", "u1")
    unmatched = [
        served_trace(store, "What is the capital of France?", "Paris.", "u2"),
        served_trace(store, "Name a colour of the sky.", "Blue.", "u3"),
    ]
    store.close()
    settings = cfg.improve.updated(envs=["calculator"], source="traffic", judge=True, max_tokens=24)
    job = ImproveJob(cfg, settings)
    job.open(resume=False)
    cycle = CycleState(index=1)
    asyncio.run(job._collect_traffic(cycle))
    traffic = cycle.traffic
    assert traffic["judge"] is True
    assert traffic["judge_graded"] + traffic["judge_failed"] == len(unmatched)
    assert traffic["graded_by"].get("verifier") == 1
    assert traffic["judge_graded"] >= 1, traffic["graded_by"]
    store = TraceStore(trace_db_path(cfg))
    judged = {i: [g for g in store.grades(i) if g.source == "judge"] for i in [matched, *unmatched]}
    assert not judged[matched]  # the verifier grades what matches a task
    graded = [g for i in unmatched for g in judged[i]]
    assert len(graded) == traffic["judge_graded"]
    assert all(0.0 <= g.value <= 1.0 and g.raw for g in graded)
    store.close()


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--source", "traffic", "--weak-labels"], "--weak-labels gives KTO labels"),
        (["--source", "both", "--method", "grpo"], "GRPO learns from its own rollouts"),
    ],
)
def test_traffic_options_that_cannot_work_are_refused_before_anything_runs(cli_env, options, says):
    run = subprocess.run(
        [sys.executable, "-m", "agent.cli", "improve", "calculator", *options, "--fresh"],
        env=cli_env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 1
    assert says in run.stderr + run.stdout
    assert "--method" in run.stderr + run.stdout
    db = Path(cli_env["SELFTUNE_HOME"]) / "traces.db"
    assert not db.exists() or not TraceStore(db).count(limit=None)  # no baseline: nothing ran


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_source_both_learns_from_the_tasks_and_the_traffic_in_one_cycle(cfg, cli_env):
    """`--source both`: one cycle plays the environment's train tasks and selects the traffic
    (written as the server records it, with people's thumbs and corrections); one dataset from
    both; the gate on the test split and the held-out traffic."""
    from _traces_fixtures import served_trace

    from traces.feedback import record_feedback

    cfg.workspace.ensure()
    tasks = load_environment("calculator", config=cfg.agent).split("train")
    train, held = _sessions()
    store = TraceStore(trace_db_path(cfg))
    for n, (session, task) in enumerate(zip([*train, *held], tasks[-10:], strict=True)):
        right = n % 2 == 0
        trace_id = served_trace(store, task.prompt, f"{task.answer:g}" if right else "7", session)
        record_feedback(
            store, trace_id, right, correction=None if right else f"{task.answer:g}", who="ann"
        )
    store.close()
    env = dict(
        cli_env,
        SELFTUNE_IMPROVE__MIN_NEW_TRACES="2",
        SELFTUNE_IMPROVE__RATIONALISE="false",  # one collection wave: zero-shot
        SELFTUNE_IMPROVE__SELF_DEMOS="false",
        SELFTUNE_IMPROVE__REPLAY="[]",  # no replay of the general probe's tasks: minutes
        SELFTUNE_IMPROVE__TRAFFIC_REPLAY="false",  # the corrections as they are (replay: above)
        SELFTUNE_MODEL__MAX_NEW_TOKENS="32",
        SELFTUNE_TUNER__GATE__PROBE="",
        SELFTUNE_TUNER__GATE__ROBUSTNESS="[]",
    )
    args = ["improve", "calculator", "--source", "both", "--since", "1d", "--collect-limit", "2",
            "--few-shot", "0", "--no-hints", "--eval-limit", "2", "--max-train-steps", "2",
            "--max-tokens", "32", "--concurrency", "8", "--fresh"]  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=2300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    (state_file,) = cfg.workspace.root.glob("jobs/improve-*/state.json")
    cycle = JobState.load(state_file).cycles[0]
    assert cycle.skipped is None and cycle.candidate, cycle.skipped
    assert cycle.collect["calculator"]["n"] == 2  # the environment's train tasks were played
    assert set(cycle.traffic["heldout_sessions"]) == set(held)
    out = Path(cycle.dataset["dir"])
    provenance = json.loads((out / "provenance.json").read_text())
    sides = cycle.dataset["rows_from"]
    assert sides["envs"] == cycle.collect["calculator"]["tasks_solved"]
    assert sides["envs"] == sum(p["signal"] == "environment" for p in provenance)
    assert sides["traffic"] == len(provenance) - sides["envs"] > 0
    assert "correction" in cycle.dataset["rows_by_signal"]
    heldout_ids = {i["trace_id"] for i in cycle.traffic["items"] if i["heldout"]}
    assert not {p["trace_id"] for p in provenance} & heldout_ids
    gate = Registry(cfg.workspace.root / "adapters").get(cycle.candidate).eval_results[-1]
    assert {r["env"] for r in gate["candidate"]} == {"calculator", "traffic-heldout"}
    assert gate["traffic"]["heldout_tasks"] == len(heldout_ids) == cycle.traffic["gate"]["n"]
