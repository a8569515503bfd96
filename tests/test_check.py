"""`selftune check ENV`: a grader must give the reference 1 and an empty, a constant and an
echoed answer 0; a grader that rewards everything is caught before any training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from agent.envs import load_environment
from agent.envs.check import check_environment, probe_answers
from traces.schemas import Task

TASKS = [{"id": f"t{i}", "prompt": f"What is {i} * 7?", "answer": i * 7} for i in range(3, 9)]


def _env(tmp_path: Path, grade: str | None = None) -> Path:
    folder = tmp_path / "env"
    folder.mkdir()
    (folder / "tasks.jsonl").write_text("".join(json.dumps(t) + "\n" for t in TASKS))
    if grade is not None:
        (folder / "environment.py").write_text(
            f"GRADER = 'env'\n\ndef grade(task, answer, trace):\n    return {grade}\n"
        )
    return folder


async def test_the_builtin_calculator_grader_passes_every_probe():
    report = await check_environment(load_environment("calculator"), limit=40)
    assert report.tasks == 40 and report.ok, report.summary()


async def test_a_grader_that_rewards_everything_is_caught(tmp_path):
    report = await check_environment(load_environment(str(_env(tmp_path, grade="1.0"))))
    assert not report.ok and report.blocks_training()
    assert report.by_probe() == {"reference": 0, "empty": 6, "constant": 6, "echo": 6}
    assert "empty" in report.summary()


async def test_a_grader_that_rewards_nothing_fails_the_reference(tmp_path):
    report = await check_environment(load_environment(str(_env(tmp_path, grade="0.0"))))
    assert report.by_probe()["reference"] == 6 and report.blocks_training()


def test_a_probe_equal_to_the_reference_is_left_out():
    task = Task(id="t", prompt="Say I don't know.", answer="I don't know.")
    assert "constant" not in probe_answers(task)


def test_the_command_exits_1_and_names_the_failing_probe(tmp_path, cli_env):
    folder = _env(tmp_path, grade="1.0")
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "check", str(folder), "--json"],
        env=cli_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["failed_by_probe"]["echo"] == 6 and not report["ok"]


def test_improve_stops_on_a_broken_grader_before_collecting(tmp_path, cli_env):
    folder = _env(tmp_path, grade="1.0")
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "improve", str(folder), "--fresh"],
        env=cli_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "the grader failed 18 probes on 6 tasks" in done.stderr.replace("\n", " ")
    assert "collect" not in done.stdout  # no episode was played
