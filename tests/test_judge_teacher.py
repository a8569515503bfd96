"""The teacher as the LLM judge (`[improve] judge = "teacher"`, `[tuner.grpo] judge`): a real
`selftune serve` (uvicorn on loopback, the real SmolLM2, recording into its own SQLite store)
is the `[teacher]`; it grades the traffic no task matches and ranks GRPO groups, its grades
name it, and its own store shows that the judge requests reached it. A judge = "teacher"
with no `[teacher]` is refused before anything runs."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from _serve_fixtures import cli_server, workspace
from _traces_fixtures import served_trace

import agent.workspace
from agent.config import ConfigError, load_config
from agent.envs import load_environment
from traces.schemas import Task
from traces.store import TraceStore
from tuner.teacher import TeacherError, make_judge

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"
GRADER = f"judge:teacher:{MODEL}"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, model_path):
    """`selftune serve --no-agent` in a workspace of its own: its base URL (with /v1) and
    the path of the store it records every completion it answers in."""
    home = tmp_path_factory.mktemp("teacher")
    workspace(home, model_path)
    with cli_server(home, "--no-agent", log=home / "serve.log") as url:
        yield f"{url}/v1", home / "traces.db"


def _student(root: Path, model_path: Path, teacher_url: str | None):
    workspace(root, model_path)  # the shared converted model, linked in
    env = {"SELFTUNE_HOME": str(root), "SELFTUNE_IMPROVE__JUDGE": "teacher"}
    if teacher_url:
        env |= {"SELFTUNE_TEACHER__BASE_URL": teacher_url, "SELFTUNE_TEACHER__MODEL": MODEL}
    return load_config(environ=env)


def _asked(db: Path) -> list[str]:
    """What each completion the teacher answered was asked, one text per request, oldest first."""
    store = TraceStore(db)
    try:
        traces = sorted((store.get(t.id) for t in store.query()), key=lambda t: t.start)
        return [" ".join(str(m.get("content")) for m in t.spans[0].llm.messages) for t in traces]
    finally:
        store.close()


def test_the_teacher_grades_the_traffic_no_task_matches_and_its_grades_say_so(
    tmp_path, model_path, teacher
):
    from tuner.improve import CycleState, ImproveJob

    url, teacher_db = teacher
    cfg = _student(tmp_path / "ws", model_path, url)
    assert cfg.improve.judge == "teacher"
    cfg.workspace.ensure()
    task = load_environment("calculator", config=cfg.agent).split("train")[0]
    store = TraceStore(cfg.workspace.traces_db)
    matched = served_trace(store, task.prompt, f"{task.answer:g}", "u1")
    questions = ["What is the capital of France?", "Name a colour of the sky."]
    unmatched = [
        served_trace(store, questions[0], "Paris.", "u2"),
        served_trace(store, questions[1], "Blue.", "u3"),
    ]
    store.close()
    before = len(_asked(teacher_db))
    engines = set(agent.workspace._engines)

    job = ImproveJob(cfg, cfg.improve.updated(envs=["calculator"], source="traffic", max_tokens=24))
    job.open(resume=False)
    cycle = CycleState(index=1)
    asyncio.run(job._collect_traffic(cycle))

    traffic = cycle.traffic
    assert traffic["judge"] is True and traffic["judge_grader"] == GRADER
    assert url in traffic["judge_description"]
    assert traffic["judge_graded"] + traffic["judge_failed"] == len(unmatched)
    assert traffic["judge_graded"] >= 1, traffic
    assert traffic["graded_by"].get("verifier") == 1
    # the teacher was asked, once per unmatched answer, with the question in the prompt
    asked = _asked(teacher_db)[before:]
    assert len(asked) == len(unmatched)
    assert all(any(q in text for text in asked) for q in questions)
    assert set(agent.workspace._engines) == engines  # no base model was loaded here to judge
    store = TraceStore(cfg.workspace.traces_db)
    judged = {i: [g for g in store.grades(i) if g.source == "judge"] for i in [matched, *unmatched]}
    store.close()
    assert not judged[matched]  # the verifier grades what matches a task
    grades = [g for i in unmatched for g in judged[i]]
    assert len(grades) == traffic["judge_graded"]
    assert all(g.grader == GRADER and 0.0 <= g.value <= 1.0 and g.raw for g in grades)


def test_the_teacher_ranks_grpo_groups_as_the_group_judge(tmp_path, model_path, teacher):
    from tuner.grpo import judge_groups

    url, teacher_db = teacher
    cfg = _student(tmp_path / "ws", model_path, url)
    cfg.workspace.ensure()
    question = "What is 2 + 3?"
    store = TraceStore(cfg.workspace.traces_db)
    ids = [served_trace(store, question, answer, "g") for answer in ("5", "7")]
    before = len(_asked(teacher_db))

    judge = asyncio.run(make_judge(cfg, "teacher", max_tokens=48))
    assert judge.grader == GRADER and judge.group_grader == f"judge-group:teacher:{MODEL}"
    outcomes = [SimpleNamespace(trace_id=i, grade_error=None) for i in ids]
    scores = asyncio.run(
        judge_groups(judge, {"t": Task(id="t", prompt=question)}, {"t": outcomes}, store)
    )

    asked = _asked(teacher_db)[before:]
    assert len(asked) == 1 and question in asked[0]  # one prompt holds the whole group
    grades = [g for i in ids for g in store.grades(i)]
    store.close()
    assert len(grades) == len(ids)
    assert all(g.grader == judge.group_grader and g.source == "judge" for g in grades)
    assert set(scores) <= set(ids)


def test_a_teacher_judge_without_a_teacher_is_refused_naming_the_fix(tmp_path, model_path):
    # in the config file or the environment: the config does not load
    with pytest.raises(ConfigError, match=r"\[improve\] judge = 'teacher'.*\[teacher\] base_url"):
        _student(tmp_path / "ws", model_path, None)
    cfg = load_config(environ={"SELFTUNE_HOME": str(tmp_path / "ws")})
    with pytest.raises(TeacherError, match=r"set \[teacher\] base_url"):
        asyncio.run(make_judge(cfg, "teacher"))
    # true and false, as before there was a choice, still mean the base model and off; the
    # base model's grades name it as the teacher's name the teacher
    assert cfg.improve.updated(judge=True).judge == "base"
    assert asyncio.run(make_judge(cfg, "base")).grader == f"judge:base:{MODEL}"
    assert cfg.tuner.grpo.updated(judge="off").judge is None
    with pytest.raises(ValueError, match="judge must be 'base'"):
        cfg.improve.updated(judge="strong")

    # on the command line: one line, before the baseline or anything else ran
    env = {**os.environ, "SELFTUNE_HOME": str(tmp_path / "ws")}
    run = subprocess.run(
        [sys.executable, "-m", "agent.cli", "improve", "calculator", "--source", "traffic",
         "--judge", "teacher", "--fresh"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = run.stderr + run.stdout
    assert run.returncode == 1, out
    assert "no teacher is configured to judge with" in out and "[teacher] base_url" in out
    assert "Traceback" not in out
    assert not (tmp_path / "ws" / "traces.db").exists()  # nothing ran
