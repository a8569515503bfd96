"""Every command exits: run as a user would (a real `selftune` process each) against a bad
adapter version, a bad environment and a dead model server, each command ends non-zero within
its timeout with one readable line that names the problem: no traceback, no hang."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.config import Config

TIMEOUT = 120  # s per command; a hang fails the test instead of holding CI


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def selftune(
    args: list[str], env: dict[str, str], stdin: str | None = None, cwd: Path | None = None
) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    try:
        run = subprocess.run(
            [sys.executable, "-m", "agent.cli", *args],
            env=env, input=stdin, capture_output=True, text=True, timeout=TIMEOUT, cwd=cwd,
        )  # fmt: skip
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"`selftune {' '.join(args)}` did not exit within {TIMEOUT} s:\n{e.stderr}")
    return run, time.monotonic() - t0


def assert_one_line_error(run: subprocess.CompletedProcess[str], *names: str) -> None:
    err = run.stderr
    assert run.returncode != 0, f"exit 0:\nstdout: {run.stdout[-2000:]}\nstderr: {err[-2000:]}"
    assert "Traceback" not in err, err[-4000:]
    # `error:` is selftune's line; `Error:` click's for a usage error (exit 2)
    errors = [line for line in err.splitlines() if line.lower().startswith("error:")]
    assert errors, f"no `error:` line on stderr:\n{err[-3000:]}"
    assert any(all(n.lower() in line.lower() for n in names) for line in errors), (
        f"no error line names {names}:\n{err[-3000:]}"
    )


@pytest.fixture
def env(cfg: Config, tmp_path: Path) -> dict[str, str]:
    e = dict(os.environ)
    e["SELFTUNE_HOME"] = str(cfg.workspace.root)
    e["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    e.pop("SELFTUNE_MODEL__BACKEND", None)
    return e


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    """A tiny valid SFT dataset folder, so `tune sft` gets as far as the adapter."""
    import json

    d = tmp_path / "ds"
    d.mkdir()
    row = {
        "messages": [
            {"role": "user", "content": "what is 2+3?"},
            {"role": "assistant", "content": "5"},
        ]
    }
    (d / "train.jsonl").write_text("\n".join(json.dumps(row) for _ in range(4)) + "\n")
    (d / "manifest.json").write_text(json.dumps({"kind": "sft", "rows": 4}))
    return d


# (a) an adapter version that does not exist: every command that takes one
BAD_ADAPTER = {
    "run": ["run", "what is 2+3?", "--adapter", "v99"],
    "eval": ["eval", "calculator", "--limit", "1", "--adapter", "v99"],
    "chat": ["chat", "hello", "--adapter", "v99"],
    "collect": ["collect", "calculator", "--limit", "1", "--samples", "1", "--adapter", "v99"],
    "adapters promote": ["adapters", "promote", "v99"],
    "adapters promote --force": ["adapters", "promote", "v99", "--force"],
    "adapters show": ["adapters", "show", "v99"],
    "gate": ["gate", "v99", "--env", "calculator", "--eval-limit", "1"],
    "serve": ["serve", "--port", "0", "--adapter", "x=/nonexistent/adapter"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", BAD_ADAPTER)
def test_a_missing_adapter_version_is_one_line_and_exit(name: str, env: dict[str, str]):
    run, took = selftune(BAD_ADAPTER[name], env)
    names = ("/nonexistent/adapter",) if name == "serve" else ("v99",)
    assert_one_line_error(run, *names)


@pytest.mark.slow
def test_tune_from_a_missing_version_is_one_line_and_exit(env, dataset_dir: Path):
    run, _ = selftune(["tune", "sft", str(dataset_dir), "--from", "v99", "--max-steps", "1"], env)
    assert_one_line_error(run, "v99")


# (b) an environment that is not there
BAD_ENV = {
    "eval": ["eval", "nosuchenv", "--limit", "1"],
    "eval path": ["eval", "/nonexistent/env/dir", "--limit", "1"],
    "collect": ["collect", "nosuchenv", "--limit", "1", "--samples", "1"],
    "check": ["check", "nosuchenv"],
    "improve": ["improve", "nosuchenv", "--cycles", "1", "--fresh"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", BAD_ENV)
def test_a_missing_environment_is_one_line_and_exit(name: str, env: dict[str, str]):
    run, _ = selftune(BAD_ENV[name], env)
    assert_one_line_error(run, "nosuchenv" if "path" not in name else "/nonexistent/env/dir")


# (c) a model server that is not there: `[model] backend = "openai"` at a closed port
DEAD_SERVER = {
    "run": (["run", "-"], "what is 2+3?"),
    "run --file": (["run", "--file", "{task_file}"], None),
    "eval": (["eval", "calculator", "--limit", "1"], None),
    "chat": (["chat", "hello"], None),
    "collect": (["collect", "calculator", "--limit", "1", "--samples", "1"], None),
    "improve": (
        [
            "improve",
            "calculator",
            "--cycles",
            "1",
            "--fresh",
            "--collect-limit",
            "1",
            "--eval-limit",
            "1",
        ],
        None,
    ),  # fmt: skip
}


@pytest.mark.slow
@pytest.mark.parametrize("name", DEAD_SERVER)
def test_a_dead_model_server_is_one_line_and_exit(name: str, env: dict[str, str], tmp_path: Path):
    port = closed_port()
    env = {
        **env,
        "SELFTUNE_MODEL__BACKEND": "openai",
        "SELFTUNE_MODEL__BASE_URL": f"http://127.0.0.1:{port}/v1",
    }
    task_file = tmp_path / "task.txt"
    task_file.write_text("what is 2+3?")
    args, stdin = DEAD_SERVER[name]
    args = [a.replace("{task_file}", str(task_file)) for a in args]
    run, took = selftune(args, env, stdin=stdin)
    assert_one_line_error(run, f"127.0.0.1:{port}")


@pytest.mark.slow
def test_commands_on_an_empty_store_and_registry_exit_cleanly(env, tmp_path: Path):
    # dataset build with no traces, export of nothing, promote of nothing: clear errors or
    # a clean empty result, never a traceback
    run, _ = selftune(["dataset", "build", "sft", "--env", "nosuchenv"], env)
    assert_one_line_error(run, "nosuchenv")
    out = tmp_path / "x.jsonl"
    run, _ = selftune(["traces", "export", str(out), "--format", "nosuchformat"], env)
    assert_one_line_error(run, "nosuchformat")
    run, _ = selftune(["traces", "export", str(tmp_path / "no" / "such" / "dir" / "x.jsonl")], env)
    assert run.returncode in (0, 1) and "Traceback" not in run.stderr, run.stderr[-3000:]


@pytest.fixture
def full_disk(tmp_path: Path):
    """A tiny tmpfs filled to the last byte (root only: skipped where it cannot be mounted)."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:  # fmt: skip
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(folder: Path) -> None:
    with open(folder / "fill", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 512)
        except OSError:
            pass


def test_a_full_disk_is_said_to_be_full_never_to_move_the_store(env, cfg, full_disk: Path):
    from traces.store import TraceStore

    ws = full_disk / "ws"
    TraceStore(ws / "traces.db").close()  # a real store, then the disk fills up
    for p in ws.glob("traces.db-*"):
        p.unlink()
    _fill(full_disk)
    run, took = selftune(["traces", "list"], {**env, "SELFTUNE_HOME": str(ws)})
    assert_one_line_error(run, "full")
    assert "move it away" not in run.stderr and took < TIMEOUT
    assert "the store itself is not damaged" in run.stderr
    # an export onto a full disk: one line naming the file, and no half-written file left
    from _traces_fixtures import ADD, make_trace

    store = TraceStore(cfg.workspace.traces_db)
    store.save(make_trace(calls=[ADD]))
    store.close()
    out = full_disk / "export.jsonl"
    for fmt in ("jsonl", "otel-json"):
        run, _ = selftune(["traces", "export", str(out), "--format", fmt], env)
        assert_one_line_error(run, str(out))
        assert not out.exists()


@pytest.mark.slow
def test_serve_starts_answers_health_and_stops_on_sigterm(env):
    """`serve` is the one command meant to keep running: it must come up, and a SIGTERM must
    end it promptly (exit code from the interrupt, no traceback)."""
    import signal

    import httpx

    port = closed_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "serve", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0 or "Traceback" not in err
    assert "Traceback" not in err, err[-3000:]
