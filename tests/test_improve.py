"""The improve loop end to end on the real model, with small limits: it is killed after
training, resumed, and must finish with the gate's decision in the registry and the agent
answering with the new adapter. It asserts the mechanism, not a lucky score."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.agent import Agent
from tuner.improve import JobState, curve_points, parse_every
from tuner.registry import Registry

ROOT = Path(__file__).resolve().parent.parent
# `python -m agent.cli` from this checkout (run with cwd=ROOT): the `selftune` script may import
# another checkout's code
SELFTUNE = [sys.executable, "-m", "agent.cli"]
# small limits: 8 train tasks collected in up to three waves (demonstrations, hints, similar
# solved tasks), 4 training steps, 6 held-out tasks per model in the gate
ARGS = [
    "improve",
    "calculator",
    "--collect-limit",
    "8",
    "--eval-limit",
    "6",
    "--max-train-steps",
    "4",
    "--concurrency",
    "8",
]


def _state(home: Path) -> JobState | None:
    files = sorted(home.glob("jobs/improve-*/state.json"))
    if not files:
        return None
    try:
        return JobState.load(files[-1])
    except (json.JSONDecodeError, TypeError, KeyError):
        return None  # caught mid-replace: try again


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_improve_cycle_killed_after_training_resumes_and_finishes(cfg, cli_env, tmp_path):
    home = cfg.workspace.root
    # the guards beyond the job's own environment have tests of their own (test_gate_guards):
    # here they would only double the gate's episodes
    env = dict(
        cli_env,
        SELFTUNE_IMPROVE__MIN_NEW_TRACES="1",
        SELFTUNE_TUNER__GATE__PROBE="",
        SELFTUNE_TUNER__GATE__ROBUSTNESS="[]",
    )
    first = subprocess.Popen(
        [*SELFTUNE, *ARGS],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 1500
    try:
        while time.time() < deadline:
            st = _state(home)
            if st and st.cycles and "tune" in st.cycles[0].done:
                break
            if first.poll() is not None:
                pytest.fail("improve ended before training:\n" + first.stdout.read()[-3000:])
            time.sleep(1)
        else:
            pytest.fail("improve did not reach the tune step in time")
        os.kill(first.pid, signal.SIGKILL)  # somewhere in the gate: evaluating, or promoting
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()

    # the registry is valid after the kill: the candidate exists, nothing half-promoted
    reg = Registry(home / "adapters")
    candidate = _state(home).cycles[0].candidate
    assert candidate and reg.get(candidate).status in ("candidate", "active", "rejected")

    second = subprocess.run(
        [*SELFTUNE, *ARGS], env=env, cwd=ROOT, capture_output=True, text=True, timeout=1500
    )
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    assert "resuming job" in second.stderr
    st = _state(home)
    assert st.finished is not None
    cyc = st.cycles[0]
    assert (
        cyc.done == ["collect", "dataset", "tune", "gate", "reload"] and cyc.candidate == candidate
    )

    # each step's seconds and the engine's work in it are recorded (benchmarks.bench_cycle)
    assert set(cyc.step_s) == set(cyc.done) and all(v > 0 for v in cyc.step_s.values())
    assert cyc.step_engine["collect"]["completion_tokens"] > 0
    assert cyc.step_engine["gate"]["completion_tokens"] > 0
    assert st.baseline_s > 0 and st.baseline_engine["requests"] > 0

    # collection bootstrapped: the demonstrations' wave, then the failed tasks with their hints
    waves = [w["kind"] for w in cyc.collect["calculator"]["waves"]]
    assert waves[:2] == ["demos", "hinted"] and cyc.dataset["rows"] >= 1

    # the gate ran on held-out tasks and its decision, with every number, is in the registry
    rec = reg.get(candidate)
    gate = rec.eval_results[-1]
    assert gate["gate"]["candidate"] == candidate
    assert all(s["split"] == "test" and s["n"] == 6 for s in gate["candidate"] + gate["active"])
    assert rec.status == ("active" if gate["gate"]["promote"] else "rejected")
    assert reg.active() is None or reg.active().version == candidate
    assert rec.metrics["global_step"] == 4

    # report: the table and the learning curve
    assert (
        "learning curve:" in second.stdout
        and Path(second.stdout.split("learning curve:")[1].split()[0]).is_file()
    )
    labels = [label for label, _ in curve_points(st)]
    assert labels[:2] == ["base", "base few-shot"] and labels[2].startswith(f"c1 {candidate}")

    # the agent answers with the new adapter (the active one if promoted, else by name)
    async def answer():
        async with Agent(cfg) as agent:
            res = await agent.run(
                "What is 12 * 13?",
                tools=["calculator"],
                adapter=None if rec.status == "active" else candidate,
            )
            return res, agent.tracer.store.get(res.trace_id)

    res, trace = asyncio.run(answer())
    assert trace.adapter == candidate
    assert all(s.llm.adapter == candidate for s in trace.spans if s.kind == "llm")


def test_a_second_job_is_refused_while_one_holds_the_lock(cfg):
    from tuner.improve import ImproveError, job_lock

    with job_lock(cfg):
        with pytest.raises(ImproveError, match="another improve job holds"):
            with job_lock(cfg):
                pass


def test_a_missing_model_is_one_line_that_says_run_setup(tmp_path):
    env = dict(os.environ, SELFTUNE_HOME=str(tmp_path / "empty"))
    out = subprocess.run(
        [*SELFTUNE, "improve", "calculator"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1
    assert "does not exist: run `selftune setup`" in out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr


def test_options_left_out_take_the_config_and_given_ones_override_it(monkeypatch, tmp_path):
    """`selftune improve`: [improve] (here from SELFTUNE_* variables) is the default of every
    option; an option given wins."""
    import typer
    from typer.testing import CliRunner

    import tuner.improve
    from agent.cli.tune import improve

    seen = {}

    async def fake_improve(cfg, settings, *, every_s=None, resume=None, console=None):
        seen.update(settings=settings, every_s=every_s)

    monkeypatch.setattr(tuner.improve, "improve", fake_improve)
    monkeypatch.setenv("SELFTUNE_HOME", str(tmp_path))
    monkeypatch.setenv("SELFTUNE_IMPROVE__COLLECT_LIMIT", "5")
    monkeypatch.setenv("SELFTUNE_IMPROVE__ENVS", '["calculator"]')
    monkeypatch.chdir(tmp_path)  # no stray ./selftune.toml
    app = typer.Typer()
    app.command()(improve)
    app.command()(lambda: None)  # two commands: `improve` is a sub-command, as in selftune
    res = CliRunner().invoke(app, ["improve", "--eval-limit", "7", "--no-hints"], obj={})
    assert res.exit_code == 0, res.output
    s = seen["settings"]
    assert s.collect_limit == 5 and s.envs == ["calculator"]  # from the config
    assert s.eval_limit == 7 and s.hints is False  # given
    assert s.cycles == 1 and s.method == "sft" and seen["every_s"] is None  # the defaults
    res = CliRunner().invoke(app, ["improve", "--method", "ppo"], obj={})
    assert res.exit_code == 1 and "--method 'ppo'" in res.output


def test_every_parses_durations():
    assert parse_every("30m") == 1800 and parse_every("6h") == 21600 and parse_every("1d") == 86400
    with pytest.raises(Exception, match="not a duration"):
        parse_every("soon")
