"""Real servers for the serving tests: the app under uvicorn in a thread (sharing one engine),
or `selftune serve` itself as a subprocess, each on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import uvicorn

from agent.config import DEFAULT_MODEL, Config, load_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout_s: float = 240.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server at {url} exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the server at {url} did not start in {timeout_s:g} s")


def workspace(root: Path, model_path: Path) -> Config:
    """A config whose workspace is `root`, with the shared converted model linked in."""
    (root / "models").mkdir(parents=True, exist_ok=True)
    link = root / "models" / DEFAULT_MODEL
    if not link.exists():
        link.symlink_to(model_path, target_is_directory=True)
    return load_config(environ={"SELFTUNE_HOME": str(root)})


@contextlib.contextmanager
def app_server(app) -> Iterator[str]:
    """Serve a Starlette app with uvicorn on a free port; yields its base URL (no /v1)."""
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, 60)
    try:
        yield url
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


@contextlib.contextmanager
def cli_server(home: Path, *args: str, log: Path) -> Iterator[str]:
    """`selftune serve ARGS` as a subprocess with SELFTUNE_HOME=home; yields its base URL."""
    port = free_port()
    env = {**os.environ, "SELFTUNE_HOME": str(home)}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "serve", "--port", str(port), *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(url, proc=proc)
        except RuntimeError as e:
            raise RuntimeError(f"{e}; its log:\n{log.read_text()[-3000:]}") from None
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
