"""The `python` tool: run model-written code in a bubblewrap sandbox.

The sandbox is bubblewrap (`bwrap`, the tool Flatpak builds its sandboxes with): kernel
namespaces set up by a maintained program instead of checks of our own. What the code gets:
- its own mount namespace whose root is an empty read-only tmpfs with, read-only, /usr (and
  the /bin, /lib... links), the dynamic loader's cache and the interpreter's prefixes (the venv
  and the Python it was made from); a fresh /proc of its own pid namespace, a minimal /dev
  and a size-limited tmpfs /tmp holding its working folder, the only writable place. The
  workspace, the home folder, /etc and every other host path are simply not there;
- new pid, network (loopback only, down), ipc, uts and cgroup namespaces: no host process is
  visible or signalable, nothing can be reached over the network, not even 127.0.0.1;
- an unprivileged uid in a user namespace of its own (host uid 65534 when selftune runs as
  root, the user's own uid otherwise), no capabilities, no_new_privs, and no way to make
  further user namespaces (`--disable-userns`), so no `unshare` or `setns` back out;
- an empty environment apart from a few fixed variables (--clearenv);
- rlimits set inside the namespace by util-linux `prlimit`: CPU time, address space, file
  size, no core files, and number of processes (which binds because the uid is not 0);
- the code runs as pid 1 of its pid namespace (`--as-pid-1`): when it exits, the kernel kills
  every process it left behind, so nothing outlives the call; a wall-clock timeout kills it.

Run as root, bwrap builds the sandbox without a user namespace, drops every capability but
the three `setpriv` needs to become uid 65534, and a second bwrap then makes the user
namespace as that uid. Where bwrap is missing or cannot build the sandbox (no unprivileged
user namespaces for a non-root user), run_python raises SandboxUnavailable with the reason
and the fix; there is no weaker fallback.
"""

from __future__ import annotations

import functools
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from tools.base import Tool, ToolError

SANDBOX_UID = 65534  # "nobody": the host uid the code runs as when selftune runs as root
INSTALL = "install it with `apt-get install -y bubblewrap` as root (`make setup` does)"
_MB = 1024 * 1024


class SandboxUnavailable(ToolError):
    """This machine cannot build the sandbox; the message names what is missing and the fix."""


@dataclass(frozen=True)
class SandboxLimits:
    cpu_s: int = 10
    wall_s: float = 15.0
    memory_mb: int = 1024
    file_mb: int = 16
    max_processes: int = 64
    scratch_mb: int = 64  # the tmpfs holding /tmp and the working folder
    output_chars: int = 8000


@dataclass(frozen=True)
class SandboxResult:
    stdout: str
    stderr: str
    exit_code: int | None  # None when killed for the wall-clock timeout
    timed_out: bool
    killed_by: str | None  # "cpu", "memory", "file size", "timeout", a signal name, or None
    duration_s: float
    sandbox: str  # sandbox_mode() at the time

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


def sandbox_mode() -> str:
    """'bwrap-root' (selftune runs as root: the code becomes uid 65534) or 'bwrap-user'."""
    return "bwrap-root" if os.geteuid() == 0 else "bwrap-user"


@functools.cache
def sandbox_problem() -> str | None:
    """Why this machine cannot run the sandbox (what is missing and the fix), or None.

    Checks the programs, then builds the real sandbox once around `pass`.
    """
    if not shutil.which("bwrap"):
        return f"bubblewrap (bwrap) is not installed; {INSTALL}"
    needed = ["prlimit"] + (["setpriv"] if os.geteuid() == 0 else [])
    missing = [p for p in needed if not shutil.which(p)]
    if missing:
        return f"{' and '.join(missing)} not found; install util-linux (`apt-get install -y util-linux`)"
    run = _sandboxed("pass", SandboxLimits(wall_s=30))
    if run.started and run.returncode == 0:
        return None
    detail = (run.stderr.strip() or f"exit status {run.returncode}")[-600:]
    if os.geteuid() != 0:
        fix = (
            f"bwrap needs unprivileged user namespaces for uid {os.geteuid()} (sysctl "
            "user.max_user_namespaces > 0, kernel.unprivileged_userns_clone = 1, or an AppArmor "
            "profile allowing bwrap), or run selftune as root"
        )
    else:
        fix = "bwrap must be able to create namespaces here (in a container: allow unshare/mount)"
    return f"bubblewrap cannot build the sandbox: {detail}; {fix}"


@dataclass(frozen=True)
class _Run:
    started: bool  # the sandbox came up (bwrap reported its child's pid)
    returncode: int | None  # None when killed for the wall-clock timeout
    stdout: str
    stderr: str
    duration_s: float


def _sandboxed(code: str, limits: SandboxLimits) -> _Run:
    root = tempfile.mkdtemp(prefix="selftune-py-")
    inside = "/tmp/" + os.path.basename(root)  # the folder as the code sees it
    try:
        script = os.path.join(root, "main.py")
        with open(script, "w", encoding="utf-8") as f:
            f.write(code)
        os.chmod(script, 0o644)  # readable by uid 65534 whatever the umask
        info_r, info_w = os.pipe()
        start = time.monotonic()
        with (
            open(os.path.join(root, "stdout"), "wb") as out,
            open(os.path.join(root, "stderr"), "wb") as err,
        ):
            try:
                proc = subprocess.Popen(
                    _command(inside, script, limits, info_w),
                    cwd="/",
                    env={"PATH": "/usr/bin:/bin"},  # nothing of ours reaches even bwrap
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    pass_fds=(info_w,),
                    start_new_session=True,
                )
            finally:
                os.close(info_w)
            try:  # the pipe stays open until bwrap exits: it writes more after the pid
                child = _child_pid(info_r, deadline=start + limits.wall_s)
                try:
                    left = max(0.0, start + limits.wall_s - time.monotonic())
                    returncode = proc.wait(timeout=left)
                except subprocess.TimeoutExpired:
                    _kill(proc, child)
                    proc.wait()
                    returncode = None
            finally:
                os.close(info_r)
        duration = time.monotonic() - start
        return _Run(
            started=child is not None,
            returncode=returncode,
            stdout=_read(os.path.join(root, "stdout"), limits.output_chars),
            stderr=_read(os.path.join(root, "stderr"), limits.output_chars),
            duration_s=duration,
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _command(inside: str, script: str, limits: SandboxLimits, info_fd: int) -> list[str]:
    work = inside + "/work"
    userns = ["--unshare-user", "--disable-userns", "--uid", str(SANDBOX_UID)]
    userns += ["--gid", str(SANDBOX_UID)]
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": work,
        "TMPDIR": work,
        "LANG": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
        "OPENBLAS_NUM_THREADS": "1",  # BLAS thread pools reserve memory under RLIMIT_AS
        "OMP_NUM_THREADS": "1",
    }
    cmd = ["bwrap", "--info-fd", str(info_fd), "--die-with-parent", "--new-session"]
    cmd += ["--as-pid-1", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts"]
    cmd += ["--unshare-cgroup-try", "--hostname", "sandbox", "--clearenv"]
    for name, value in env.items():
        cmd += ["--setenv", name, value]
    cmd += _filesystem(inside, script, limits)
    if os.geteuid() == 0:
        # Root: bwrap builds the sandbox without a user namespace (a root-owned one would keep
        # the code at host uid 0, which RLIMIT_NPROC ignores); setpriv becomes uid 65534 with
        # no capabilities, and a second bwrap, unprivileged, adds the user namespace.
        cmd += ["--cap-drop", "ALL"]
        for cap in ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP"):
            cmd += ["--cap-add", cap]
        cmd += ["--", "setpriv", f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}"]
        cmd += ["--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"]
        cmd += ["bwrap", *userns, "--dev-bind", "/", "/", "--chdir", work]
    else:
        cmd += userns
    cmd += ["--", "prlimit", f"--cpu={limits.cpu_s}:{limits.cpu_s + 1}"]
    cmd += [f"--as={limits.memory_mb * _MB}", f"--fsize={limits.file_mb * _MB}"]
    cmd += [f"--nproc={limits.max_processes}", "--core=0", "--"]
    # -I: no PYTHON* variables, no user site, the script's folder not on sys.path; -u: keep
    # what was printed before a kill
    return cmd + [sys.executable, "-I", "-u", inside + "/main.py"]


def _filesystem(inside: str, script: str, limits: SandboxLimits) -> list[str]:
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = "/" + name
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    for path in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d"):
        args += ["--ro-bind-try", path, path]
    args += ["--proc", "/proc", "--dev", "/dev"]
    args += ["--perms", "1777", "--size", str(limits.scratch_mb * _MB), "--tmpfs", "/tmp"]
    made = {"/", "/usr", "/tmp"}
    for prefix in _interpreter_dirs():
        args += _parents(prefix, made) + ["--ro-bind", prefix, prefix]
    args += ["--perms", "0755", "--dir", inside, "--perms", "0777", "--dir", inside + "/work"]
    args += ["--ro-bind", script, inside + "/main.py", "--chdir", inside + "/work"]
    return args + ["--remount-ro", "/"]


def _interpreter_dirs() -> list[str]:
    """The venv and the Python it was made from, outermost first, none inside /usr or another."""
    exe_home = os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))
    dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, exe_home}
    dirs = {os.path.abspath(d) for d in dirs}
    if "/" in dirs:
        raise SandboxUnavailable("the Python interpreter's prefix is /; use a venv")

    def inside(d: str, other: str) -> bool:
        return d != other and d.startswith(other.rstrip("/") + "/")

    return sorted(d for d in dirs if not any(inside(d, o) for o in dirs | {"/usr"}) and d != "/usr")


def _parents(path: str, made: set[str]) -> list[str]:
    # bwrap makes missing mount points 0700; the code runs as another uid and must pass through
    args = []
    parts = path.strip("/").split("/")
    for i in range(1, len(parts)):
        parent = "/" + "/".join(parts[:i])
        if parent not in made:
            made.add(parent)
            args += ["--perms", "0755", "--dir", parent]
    return args


def _child_pid(fd: int, deadline: float) -> int | None:
    """The sandbox's pid 1 (host pid) from bwrap's --info-fd, or None if it never came up."""
    data = b""
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 4096)
        data += chunk
        if not chunk or re.search(rb'"child-pid":\s*\d+', data):
            break
    found = re.search(rb'"child-pid":\s*(\d+)', data)
    return int(found.group(1)) if found else None


def _kill(proc: subprocess.Popen, child: int | None) -> None:
    # SIGKILL to the namespace's pid 1 takes every process in it; then bwrap itself
    for pid, kill in ((child, os.kill), (proc.pid, os.killpg)):
        if pid is not None:
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def run_python(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `code` in the sandbox under `limits`; never raises for what the code does.

    Raises SandboxUnavailable when this machine cannot build the sandbox.
    """
    limits = limits or SandboxLimits()
    problem = sandbox_problem()
    if problem:
        raise SandboxUnavailable(f"the python tool cannot run code here: {problem}")
    run = _sandboxed(code, limits)
    if not run.started:
        raise SandboxUnavailable(f"bubblewrap failed to build the sandbox: {run.stderr.strip()}")
    rc = run.returncode
    killed_by = None
    if rc is None:
        killed_by = "timeout"
    elif rc > 128 and rc - 128 in signal.valid_signals():
        # bwrap reports a child killed by signal N as exit status 128 + N (as a shell does)
        sig = rc - 128
        killed_by = {
            signal.SIGXCPU: f"CPU time ({limits.cpu_s} s)",
            signal.SIGKILL: "CPU time or memory",
            signal.SIGXFSZ: f"file size ({limits.file_mb} MB)",
        }.get(sig, signal.Signals(sig).name)
    elif "MemoryError" in run.stderr[-2000:]:
        killed_by = f"memory ({limits.memory_mb} MB)"
    return SandboxResult(
        stdout=run.stdout,
        stderr=run.stderr,
        exit_code=rc,
        timed_out=rc is None,
        killed_by=killed_by,
        duration_s=run.duration_s,
        sandbox=sandbox_mode(),
    )


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
    # the code runs in a sandbox with no network and only its own scratch folder
    t.hints = {"readOnlyHint": True, "destructiveHint": False, "openWorldHint": False}
    if limits is not None:
        t.func = functools.partial(_run_or_raise, limits=limits)
    return t
