"""The `python` tool: run model-written code in a limited subprocess.

What is limited or isolated:
- a child process of the same interpreter, started with `-I` (no PYTHON* environment
  variables, no user site-packages, the script's folder not on sys.path) and a minimal
  environment; the stdlib and the interpreter's installed packages stay importable;
- CPU time (RLIMIT_CPU), address space (RLIMIT_AS), size of any file written (RLIMIT_FSIZE),
  number of processes (RLIMIT_NPROC; note that root ignores this one) and a wall-clock
  timeout, after which the whole process group is killed;
- the working folder is a fresh temporary folder, deleted afterwards;
- network: the code runs in a new network namespace (`unshare --net`, util-linux) that has
  only a loopback interface that is down, so no connection can be made, not even to
  127.0.0.1 on the host. Where `unshare` cannot be used (not root and no user namespaces),
  a Python audit hook blocks socket creation instead; that is weaker (C extensions and
  subprocesses get round it). `sandbox_mode()` says which one is in use.
- stdout and stderr go to files under the limits above and are truncated when returned.

What is NOT isolated: the filesystem beyond the working folder (the code can read and,
with the process's permissions, write anywhere the user running selftune can), other
processes of the same user (signals, /proc), the user id itself, and environment-independent
host information. This is a guard against accidents and runaway code, not a security
boundary against hostile code: run selftune in a container or VM for that.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from tools.base import Tool, ToolError


@dataclass(frozen=True)
class SandboxLimits:
    cpu_s: int = 10
    wall_s: float = 15.0
    memory_mb: int = 1024
    file_mb: int = 16
    max_processes: int = 64
    output_chars: int = 8000


@dataclass(frozen=True)
class SandboxResult:
    stdout: str
    stderr: str
    exit_code: int | None  # None when killed for the wall-clock timeout
    timed_out: bool
    killed_by: str | None  # "cpu", "memory", "file size", "timeout", a signal name, or None
    duration_s: float
    network: str  # sandbox_mode() at the time

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def text(self) -> str:
        """What the model sees: the exit status, then stdout and stderr."""
        if self.timed_out:
            status = f"killed: wall-clock timeout ({self.duration_s:.1f} s)"
        elif self.killed_by:
            status = f"killed: {self.killed_by} limit exceeded (exit status {self.exit_code})"
        else:
            status = f"exit status {self.exit_code}"
        parts = [status]
        if self.stdout:
            parts.append("stdout:\n" + self.stdout)
        if self.stderr:
            parts.append("stderr:\n" + self.stderr)
        if not self.stdout and not self.stderr:
            parts.append("(no output: print() what you want to see)")
        return "\n".join(parts)


# the audit-hook fallback, prepended to the user's code when unshare is unavailable
_SOCKET_BLOCK = """\
import sys as _s
def _selftune_block(event, args):
    if event in ("socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo"):
        raise PermissionError("network access is disabled in the selftune sandbox")
_s.addaudithook(_selftune_block)
del _s, _selftune_block
"""


@functools.cache
def sandbox_mode() -> str:
    """'netns' (unshare --net), 'netns-user' (unshare in a user namespace) or 'audit-hook'."""
    unshare = shutil.which("unshare")
    if unshare:
        for mode, flags in (
            ("netns", ["--net"]),
            ("netns-user", ["--user", "--map-root-user", "--net"]),
        ):
            try:
                r = subprocess.run([unshare, *flags, "--", "true"], capture_output=True, timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if r.returncode == 0:
                return mode
    return "audit-hook"


def _command(script: str) -> list[str]:
    mode = sandbox_mode()
    py = [sys.executable, "-I", script]
    if mode == "netns":
        return ["unshare", "--net", "--", *py]
    if mode == "netns-user":
        return ["unshare", "--user", "--map-root-user", "--net", "--", *py]
    return py


def _limit(limits: SandboxLimits) -> None:
    # Runs in the child between fork and exec.
    os.setsid()
    mb = 1024 * 1024
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mb, limits.memory_mb * mb))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_mb * mb, limits.file_mb * mb))
    resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_python(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `code` in a fresh subprocess under `limits`; never raises for what the code does."""
    limits = limits or SandboxLimits()
    mode = sandbox_mode()
    root = tempfile.mkdtemp(prefix="selftune-py-")
    try:
        work = os.path.join(root, "work")
        os.mkdir(work)
        script = os.path.join(root, "main.py")
        with open(script, "w", encoding="utf-8") as f:
            f.write(_SOCKET_BLOCK + code if mode == "audit-hook" else code)
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": work,
            "TMPDIR": work,
            "LANG": "C.UTF-8",
            "PYTHONIOENCODING": "utf-8",
            "PYTHONUNBUFFERED": "1",  # keep what was printed before a crash
            "OPENBLAS_NUM_THREADS": "1",  # BLAS thread pools reserve memory under RLIMIT_AS
            "OMP_NUM_THREADS": "1",
        }
        start = time.monotonic()
        with (
            open(os.path.join(root, "stdout"), "wb") as out,
            open(os.path.join(root, "stderr"), "wb") as err,
        ):
            proc = subprocess.Popen(
                _command(script),
                cwd=work,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                preexec_fn=lambda: _limit(limits),  # noqa: PLW0108
            )
            timed_out = False
            try:
                code_ = proc.wait(timeout=limits.wall_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
                code_ = proc.wait()
        duration = time.monotonic() - start
        stdout = _read(os.path.join(root, "stdout"), limits.output_chars)
        stderr = _read(os.path.join(root, "stderr"), limits.output_chars)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    killed_by = None
    if timed_out:
        killed_by = "timeout"
    elif code_ < 0:
        sig = -code_
        killed_by = {
            signal.SIGXCPU: f"CPU time ({limits.cpu_s} s)",
            signal.SIGKILL: "CPU time or memory",
            signal.SIGXFSZ: f"file size ({limits.file_mb} MB)",
        }.get(sig, signal.Signals(sig).name)
    elif "MemoryError" in stderr[-2000:]:
        killed_by = f"memory ({limits.memory_mb} MB)"
    return SandboxResult(
        stdout=stdout,
        stderr=stderr,
        exit_code=None if timed_out else code_,
        timed_out=timed_out,
        killed_by=killed_by,
        duration_s=duration,
        network=mode,
    )


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _read(path: str, limit: int) -> str:
    with open(path, "rb") as f:
        data = f.read(limit * 4 + 4)
    text = data.decode("utf-8", errors="replace")
    if len(text) > limit or os.path.getsize(path) > len(data):
        size = os.path.getsize(path)
        return text[:limit] + f"\n... [truncated: {size} bytes in all]"
    return text


def _run_or_raise(code: str, limits: SandboxLimits | None = None) -> str:
    result = run_python(code, limits)
    if not result.ok:
        raise ToolError(result.text())
    return result.text()


def python(code: str) -> str:
    """Run Python code in a sandbox and return its exit status, stdout and stderr.

    The code runs as a script in a fresh temporary folder, with no network and limited CPU
    time, memory and runtime. Use print() to show results.

    Args:
        code: The Python source code to run.
    """
    return _run_or_raise(code)


def python_tool(limits: SandboxLimits | None = None) -> Tool:
    """The `python` tool, with `limits` (defaults: SandboxLimits()). A failed run is a ToolError."""
    t = Tool.from_function(python)
    if limits is not None:
        t.func = functools.partial(_run_or_raise, limits=limits)
    return t
