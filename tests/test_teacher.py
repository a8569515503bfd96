"""The teacher: `[teacher]` config, a down endpoint's error, and a real loopback teacher
(`selftune serve` over HTTP) whose trajectories reach the dataset, marked in its manifest,
without the API key ever being written."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from rich.console import Console

from agent.config import ConfigError, TeacherConfig, load_config
from tuner.teacher import TeacherError, describe, teacher_wave

SECRET = "sk-test-teacher-" + "9f3a7c1e5b2d" * 3  # what a real key looks like


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_teacher_is_off_by_default_and_set_by_env_vars(tmp_path):
    cfg = load_config(environ={"SELFTUNE_HOME": str(tmp_path)})
    assert not cfg.teacher.configured
    cfg = load_config(
        environ={
            "SELFTUNE_HOME": str(tmp_path),
            "SELFTUNE_TEACHER__BASE_URL": "http://127.0.0.1:9/v1",
            "SELFTUNE_TEACHER__MODEL": "calc",
            "SELFTUNE_TEACHER__API_KEY_ENV": "TEACHER_KEY",
        }
    )
    assert cfg.teacher.configured and cfg.teacher.api_key_env == "TEACHER_KEY"
    assert describe(cfg.teacher) == "calc at http://127.0.0.1:9/v1"


def test_a_key_given_as_api_key_env_is_refused_and_not_echoed(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(
            environ={"SELFTUNE_HOME": str(tmp_path), "SELFTUNE_TEACHER__API_KEY_ENV": SECRET}
        )
    msg = str(e.value)
    assert "teacher.api_key_env" in msg and "name of an environment variable" in msg
    assert SECRET not in msg
    with pytest.raises(ValueError, match="name the served adapter in \\[teacher\\] model"):
        TeacherConfig(base_url="http://x/v1", adapter="v1")


async def test_a_teacher_that_is_down_says_which_key_and_what_to_do(tmp_path):
    port = _free_port()  # nothing listens here
    cfg = load_config(
        environ={
            "SELFTUNE_HOME": str(tmp_path),
            "SELFTUNE_TEACHER__BASE_URL": f"http://127.0.0.1:{port}/v1",
        }
    )
    with pytest.raises(TeacherError) as e:
        await teacher_wave(
            cfg, "calculator", {"calc-0000"}, seed=0, tags=[], console=Console(quiet=True)
        )
    msg = str(e.value)
    assert f"[teacher] base_url = 'http://127.0.0.1:{port}/v1' does not answer" in msg
    assert "selftune serve" in msg and "remove the [teacher] section" in msg
    assert not list(Path(tmp_path).glob("traces.db"))  # nothing was run


@pytest.fixture
def teacher_server(cfg, tmp_path):
    """`selftune serve` on a loopback port: the base SmolLM2 behind the OpenAI protocol."""
    port = _free_port()
    env = {**os.environ, "SELFTUNE_HOME": str(cfg.workspace.root)}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "serve", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        yield url + "/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # uvicorn waits for requests still in flight
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.slow
async def test_teacher_trajectories_reach_the_dataset_marked_in_its_manifest(
    cfg, teacher_server, monkeypatch
):
    from agent.envs import environment_tasks
    from agent.envs.run import run_suite
    from agent.workspace import open_store
    from traces.datasets import DatasetFilters, build_dataset
    from traces.schemas import TraceQuery

    monkeypatch.setenv("TEACHER_KEY", SECRET)
    cfg.teacher = TeacherConfig(base_url=teacher_server, api_key_env="TEACHER_KEY", few_shot=2)
    cfg.improve.max_tokens = 40
    started = time.time()
    # the student (local, zero-shot) on 4 train tasks; the teacher gets the ones it failed
    student = await run_suite(cfg, "calculator", split="train", limit=4, concurrency=8,
                              max_tokens=32, adapter="base", progress=False)  # fmt: skip
    failed = {o.task_id for o in student.outcomes if not o.success}
    assert failed
    stats = await teacher_wave(
        cfg, "calculator", failed, seed=0, tags=["job:t"], console=Console(quiet=True)
    )
    assert stats["n"] == len(failed) and stats["kind"] == "teacher"
    assert stats["successes"] >= 1, "the teacher (with two demonstrations) solved none"
    assert stats["kept"] == len(stats["solved"]) <= stats["successes"]  # one episode a task
    assert SECRET not in repr(stats)
    store = open_store(cfg)
    taught = store.query(TraceQuery(tag="source:teacher", limit=None), with_spans=True)
    assert len(taught) == len(failed) and {t.task_id for t in taught} == failed
    # they came over HTTP from the server: the span names the served model, not the student's
    llm = [s for t in taught for s in t.spans if s.kind == "llm"]
    assert llm and all(s.llm.sampling.get("max_tokens") == 40 for s in llm)
    assert all(t.model == "smollm2-135m-instruct" and "job:t" in t.tags for t in taught)

    out = cfg.workspace.datasets / "teacher-sft"
    res = build_dataset(
        store, "sft", out, DatasetFilters(env="calculator", since=started, best_of_n=True),
        tasks=environment_tasks("calculator", cfg)[1],
    )  # fmt: skip
    m = res.manifest
    assert m["teacher_rows"] == len(stats["solved"]) >= 1
    assert m["counts"]["by_source"]["teacher"] == m["teacher_rows"]
    assert m["counts"]["by_source"].get("self", 0) == m["rows"] - m["teacher_rows"]
    teacher_ids = {t.id for t in taught}
    for row in m["row_sources"]:
        assert row["source"] == ("teacher" if row["trace_ids"][0] in teacher_ids else "self")
    assert "| by_source teacher |" in (out / "SUMMARY.md").read_text()
    # the key went in the Authorization header only: nowhere on disk
    store.close()
    for f in [*cfg.workspace.root.rglob("*"), *out.rglob("*")]:
        if f.is_file() and not f.is_symlink():
            assert SECRET.encode() not in f.read_bytes(), f
