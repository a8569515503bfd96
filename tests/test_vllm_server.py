"""`selftune serve --engine vllm` without starting vLLM: the command, the venv's bookkeeping,
and the errors a failed start gives. tests/test_vllm.py runs the real server."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.serving.vllm import (
    BROKEN_ON_CPU,
    VllmEnv,
    VllmError,
    VllmServer,
    VllmUnavailable,
    lora_rank_for,
    serve_command,
)


def test_lora_rank_rounds_up_to_what_vllm_accepts():
    assert [lora_rank_for(r) for r in (1, 8, 9, 16, 17, 64, 300)] == [1, 8, 16, 16, 32, 64, 320]
    with pytest.raises(VllmError, match="above vLLM's largest"):
        lora_rank_for(513)


def test_command_has_the_flags_selftune_needs(cfg, tmp_path):
    cfg.tuner.train.lora_r = 24
    argv, env = serve_command(
        cfg,
        python="/venv/bin/python",
        model_dir=tmp_path / "model",
        template=tmp_path / "t.jinja",
        port=8123,
        adapters={"selftune-active": tmp_path / "v2", "v2": tmp_path / "v2"},
    )
    line = " ".join(argv)
    assert argv[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    for flag in (
        f"--model {tmp_path / 'model'}",
        f"--served-model-name {cfg.model.name}",
        "--host 127.0.0.1 --port 8123",
        "--enable-lora --max-lora-rank 32",  # 24 rounded up to a rank vLLM takes
        "--enable-auto-tool-choice --tool-call-parser hermes",
        f"--chat-template {tmp_path / 't.jinja'}",
        f"--lora-modules selftune-active={tmp_path / 'v2'} v2={tmp_path / 'v2'}",
    ):
        assert flag in line, flag
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert env["VLLM_NO_USAGE_STATS"] == "1" and env["DO_NOT_TRACK"] == "1"  # no telemetry
    assert env["HF_HUB_OFFLINE"] == "1"


def test_rollout_command_serves_the_base_weights_reloadable_on_loopback_only(cfg, tmp_path):
    kw = {"python": "/p", "model_dir": tmp_path / "m", "template": tmp_path / "t.jinja"}
    argv, env = serve_command(cfg, **kw, lora=False, served_names=["grpo-run1"], weight_reload=True)
    line = " ".join(argv)
    assert "--served-model-name grpo-run1 --host" in line  # only the policy's name
    assert "--enable-lora" not in line and "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in env
    assert env["VLLM_SERVER_DEV_MODE"] == "1"  # /collective_rpc and /reset_prefix_cache
    assert "VLLM_SERVER_DEV_MODE" not in serve_command(cfg, **kw)[1]  # never by default
    with pytest.raises(VllmError, match="must not listen on 0.0.0.0"):
        serve_command(cfg, **kw, host="0.0.0.0", lora=False, weight_reload=True)


def test_an_owned_server_dies_with_the_process_that_started_it(tmp_path):
    # a parent that starts an owned "server" (a sleeper), prints its pid and waits; kill -9 it
    script = (
        "import sys, time; from agent.serving.vllm import VllmServer; "
        f"s = VllmServer([sys.executable, '-c', 'import time; time.sleep(600)'], {{}}, "
        f"__import__('pathlib').Path({str(tmp_path / 's.log')!r}), 'http://x/v1', owned=True); "
        "s.start(); print(s.proc.pid, flush=True); time.sleep(600)"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    for _ in range(100):  # until the launcher has set the death signal and exec'd the server
        args = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        if len(args) > 2 and b"prctl" not in args[2]:  # empty while the exec is under way
            break
        time.sleep(0.05)
    assert _state(child) not in (None, "Z", "X")
    parent.kill()
    parent.wait(10)
    for _ in range(50):
        if _state(child) in (None, "Z", "X"):
            break
        time.sleep(0.1)
    assert _state(child) in (None, "Z", "X"), "the owned server outlived its parent"


def test_half_made_venv_is_not_trusted(tmp_path):
    env = VllmEnv(root=tmp_path / "vllm-cpu", cuda=False)
    (env.root / "bin").mkdir(parents=True)
    (env.root / "bin" / "python").symlink_to(sys.executable)
    assert not env.ready()  # killed before the stamp: redone on the next use
    (env.root / "selftune-engine.json").write_text(json.dumps({"package": env.package}))
    assert env.ready()
    # a stamp for another package (a GPU venv read on a CPU machine) is not this venv
    assert not VllmEnv(root=env.root, cuda=True).ready()
    assert set(BROKEN_ON_CPU) == {"torchvision", "torchaudio", "torchcodec"}


def test_no_avx2_says_so_and_points_to_the_local_backend(tmp_path, monkeypatch):
    monkeypatch.setattr("agent.model.hardware.cpu_flags", lambda: {"sse4_2"})
    with pytest.raises(VllmUnavailable, match='AVX2.*backend = "local"'):
        VllmEnv(root=tmp_path / "v", cuda=False).ensure(log=lambda m: None)
    assert not (tmp_path / "v").exists()


def test_a_server_that_dies_at_start_leaves_its_log_in_the_error(tmp_path):
    script = "import sys; print('ValueError: --max-lora-rank 7 is not supported'); sys.exit(3)"
    srv = VllmServer(
        [sys.executable, "-c", script], {}, tmp_path / "vllm.log", "http://127.0.0.1:9/v1"
    ).start()
    with pytest.raises(VllmError) as e:
        srv.wait_healthy(timeout_s=60)
    assert "exited with code 3" in str(e.value)
    assert "--max-lora-rank 7 is not supported" in str(e.value)
    assert str(tmp_path / "vllm.log") in str(e.value)


def test_stop_ends_the_whole_process_group(tmp_path):
    # a parent that ignores SIGTERM and a child: stop() escalates and reaches both
    script = (
        "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); time.sleep(600)"
    )
    srv = VllmServer([sys.executable, "-c", script], {}, tmp_path / "l.log", "http://x/v1").start()
    srv.stop(timeout_s=1)
    assert not srv.alive()
    out = subprocess.run(["pgrep", "-g", str(srv.proc.pid)], capture_output=True, text=True)
    # the orphaned child may linger as a zombie until PID 1 reaps it: dead all the same
    assert all(_state(int(pid)) in ("Z", "X", None) for pid in out.stdout.split())


def _state(pid: int) -> str | None:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def test_print_command_prints_without_installing(cli_env, cfg):
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "serve", "--engine", "vllm", "--print-command"],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in out.stdout
    assert "--enable-lora" in out.stdout and "--chat-template" in out.stdout
    assert not (cfg.workspace.root / "engines" / "vllm-cpu").exists()  # nothing installed
    assert (cfg.workspace.root / "engines" / "chat_template.jinja").is_file()
