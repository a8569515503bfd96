"""Hostile code against the python tool's sandbox: every escape a root-run subprocess allowed.

Each test runs attack code that prints ESCAPED when something works that must not; the code
gets every host path, pid and port it needs as literals, as a model that read the workspace
would. A real workspace (traces.db with a grade, an adapter registry with its `active`
pointer, both world-writable so only the sandbox stands in the way) must be byte-identical
after every test. The last tests run the same attacks from an unprivileged uid.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _traces_fixtures import ADD, make_trace

from tools import ToolError
from tools import sandbox as sb
from tools.sandbox import SandboxLimits, SandboxUnavailable, run_python, sandbox_problem
from traces.schemas import Grade
from traces.store import TraceStore

LIMITS = SandboxLimits(cpu_s=3, wall_s=12, memory_mb=256, max_processes=16, output_chars=4000)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def workspace(tmp_path: Path):
    """A small real workspace, opened to everyone; asserts it is unchanged at the end."""
    ws = tmp_path / "ws"
    ws.mkdir()
    with TraceStore(ws / "traces.db") as store:
        t = make_trace(calls=[ADD])
        store.save(t)
        store.add_grade(Grade(trace_id=t.id, value=0.2, source="verifier", grader="numeric"))
    (ws / "adapters" / "v1").mkdir(parents=True)
    (ws / "adapters" / "v1" / "record.json").write_text('{"version": "v1", "status": "active"}')
    (ws / "adapters" / "active").write_text('{"active": "v1", "history": [], "events": []}')
    for p in [ws, *ws.rglob("*")]:  # even world-writable files must not help
        p.chmod(0o777 if p.is_dir() else 0o666)
    before = _snapshot(ws)
    yield ws
    assert _snapshot(ws) == before


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _attack(code: str, limits: SandboxLimits = LIMITS) -> sb.SandboxResult:
    r = run_python(code, limits)
    assert "ESCAPED" not in r.stdout + r.stderr, r.text()
    return r


def _host_pids_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline:
                found.append(int(entry))
    return found


def test_the_code_runs_as_an_unprivileged_uid_without_capabilities():
    r = _attack(
        "import os\n"
        "print(os.getuid(), os.geteuid())\n"
        "status = open('/proc/self/status').read()\n"
        "print([l for l in status.splitlines() if l.startswith(('CapEff', 'NoNewPrivs'))])\n"
    )
    uid, euid = r.stdout.split("\n")[0].split()
    assert uid == euid == str(sb.SANDBOX_UID)
    assert "CapEff:\\t0000000000000000" in r.stdout and "NoNewPrivs:\\t1" in r.stdout


def test_the_workspace_cannot_be_written_or_even_seen(workspace: Path):
    db, active = workspace / "traces.db", workspace / "adapters" / "active"
    r = _attack(
        "import os, sqlite3\n"
        f"db, active, ws, host = {str(db)!r}, {str(active)!r}, {str(workspace)!r}, {os.getpid()}\n"
        "paths = [db, f'/proc/{host}/root' + db, f'/proc/{host}/cwd/x']\n"
        "for p in paths:\n"
        "    try:\n"
        "        open(p, 'r+b').write(b'x'); print('ESCAPED write', p)\n"
        "    except OSError as e: print('blocked', p, type(e).__name__)\n"
        "try:\n"
        "    c = sqlite3.connect(db); c.execute('update grades set value = 1.0'); c.commit()\n"
        "    print('ESCAPED sqlite')\n"
        "except sqlite3.Error as e: print('blocked sqlite', e)\n"
        "try:\n"
        "    open(active + '.tmp', 'w').write('{\"active\": \"v9\"}')\n"
        "    os.replace(active + '.tmp', active); print('ESCAPED pointer')\n"
        "except OSError as e: print('blocked pointer', type(e).__name__)\n"
        "print('visible' if os.path.exists(ws) else 'absent', ws)\n"
    )
    assert "absent" in r.stdout and r.stdout.count("blocked") == 5, r.text()


def test_the_filesystem_is_read_only_outside_the_scratch_folder():
    r = _attack(
        "import os, sys\n"
        f"targets = ['/x', '/usr/x', '/etc/x', '/proc/sys/kernel/hostname', {sys.prefix!r} + '/x']\n"
        "for p in targets:\n"
        "    try:\n"
        "        open(p, 'w').write('x'); print('ESCAPED', p)\n"
        "    except OSError as e: print('blocked', p, e.errno)\n"
        "open('scratch', 'w').write('ok'); print('scratch', open('scratch').read())\n"
    )
    assert r.ok and r.stdout.count("blocked") == 5 and "scratch ok" in r.stdout, r.text()


def test_etc_shadow_and_the_home_folder_cannot_be_read():
    home = Path.home()
    files = [str(p) for p in home.iterdir() if p.is_file()][:20]
    r = _attack(
        "import os\n"
        f"for p in ['/etc/shadow', '/etc/passwd', *{files!r}]:\n"
        "    try:\n"
        "        open(p, 'rb').read(1); print('ESCAPED read', p)\n"
        "    except OSError as e: print('blocked', p, e.errno)\n"
        f"home = {str(home)!r}\n"
        "print('home holds', sorted(os.listdir(home)) if os.path.isdir(home) else None)\n"
    )
    assert r.stdout.count("blocked") == 2 + len(files), r.text()
    # at most the folders the interpreter is mounted under, never the user's files
    listed = eval(r.stdout.split("home holds ")[1].strip())  # noqa: S307 - our own output
    assert listed is None or all((home / name).is_dir() for name in listed)


def test_the_parents_environment_is_out_of_reach(monkeypatch):
    secret = "s3cret-" + secrets.token_hex(8)
    monkeypatch.setenv("SELFTUNE_PLANTED_SECRET", secret)
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    r = _attack(
        "import os\n"
        "print(dict(os.environ))\n"
        f"for pid in [os.getppid(), {os.getpid()}, {os.getppid()}, 1, 'self'] + os.listdir('/proc'):\n"
        "    try:\n"
        "        print(pid, open(f'/proc/{pid}/environ', 'rb').read())\n"
        "    except (OSError, ValueError) as e: print(pid, type(e).__name__)\n"
    )
    assert "SELFTUNE_PLANTED_SECRET" not in r.stdout and secret not in r.stdout, r.text()


def test_no_network_not_even_by_setns_into_the_hosts_namespace():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    accepted: list[str] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            accepted.append(conn.recv(64).decode())
            conn.close()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        r = _attack(
            "import ctypes, os, socket, subprocess\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            f"port, host, hostparent = {port}, {os.getpid()}, {os.getppid()}\n"
            "def connect(how):\n"
            "    try:\n"
            "        s = socket.create_connection(('127.0.0.1', port), timeout=2)\n"
            "        s.sendall(b'sandbox'); print('ESCAPED', how)\n"
            "    except OSError as e: print('no connection', how, e.errno)\n"
            "connect('directly')\n"
            "for pid in (1, os.getppid(), host, hostparent):\n"
            "    try:\n"
            "        fd = os.open(f'/proc/{pid}/ns/net', os.O_RDONLY)\n"
            "        rc = libc.setns(fd, 0x40000000)\n"
            "        print('setns', pid, rc, ctypes.get_errno())\n"
            "    except OSError as e: print('no ns file', pid, e.errno)\n"
            "    connect(f'after setns {pid}')\n"
            "for flags in (0x40000000, 0x10000000 | 0x40000000):\n"
            "    print('unshare', hex(flags), libc.unshare(flags), ctypes.get_errno())\n"
            "    connect(f'after unshare {flags:#x}')\n"
            "r = subprocess.run(['unshare', '-Urn', 'true'], capture_output=True, text=True)\n"
            "print('unshare(1) exit', r.returncode, r.stderr.strip())\n"
            "if r.returncode == 0: print('ESCAPED unshare(1)')\n"
        )
        assert r.stdout.count("no connection") == 7, r.text()
        assert "unshare 0x40000000 -1" in r.stdout and "unshare 0x50000000 -1" in r.stdout
        # the port is open: the same connection from the host gets through
        socket.create_connection(("127.0.0.1", port), timeout=3).sendall(b"host")
        deadline = time.monotonic() + 5
        while not accepted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert accepted == ["host"]
    finally:
        stop.set()
        t.join(timeout=3)
        server.close()


def test_a_fork_bomb_is_bounded_and_leaves_nothing_behind():
    start = time.monotonic()
    r = _attack(
        "import os, time\n"
        "print(os.getcwd())\n"
        "n = 0\n"
        "for _ in range(400):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError as e:\n"
        "        print('fork refused', e.errno); break\n"
        "    if pid == 0:\n"
        "        time.sleep(60); os._exit(0)\n"
        "    n += 1\n"
        "print('forked', n)\n"
        f"if n >= {LIMITS.max_processes}: print('ESCAPED nproc')\n"
    )
    assert time.monotonic() - start < LIMITS.wall_s
    assert "fork refused" in r.stdout, r.text()
    assert _host_pids_with(r.stdout.split("\n")[0]) == []


def test_a_memory_bomb_is_bounded():
    r = _attack("x = bytearray(8 * 1024**3)\nprint('ESCAPED got 8 GB')")
    assert not r.ok and "memory" in (r.killed_by or "").lower(), r.text()


def test_detached_processes_are_gone_when_the_call_returns():
    marks = [f"{secrets.randbelow(10**6) + 10**6}.{i}" for i in range(3)]
    r = _attack(
        "import os, subprocess, time\n"
        f"a, b, c = {marks!r}\n"
        "subprocess.Popen(['setsid', 'sleep', a], stdin=subprocess.DEVNULL,\n"
        "                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "subprocess.Popen(['sleep', b], start_new_session=True)\n"
        "if os.fork() == 0:\n"  # the classic daemon: double fork, new session, parent exits
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        os.execvp('sleep', ['sleep', c])\n"
        "    os._exit(0)\n"
        "time.sleep(0.5)\n"
        "print('spawned')\n"
    )
    assert r.ok and "spawned" in r.stdout, r.text()
    assert [p for m in marks for p in _host_pids_with(m)] == []


def test_the_parent_and_other_host_processes_cannot_be_signalled():
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        r = _attack(
            "import os, signal\n"
            f"host = ({os.getpid()}, {os.getppid()}, {bystander.pid})\n"
            # A sandbox that shows host pids is already broken: say so and stop there, since
            # kill(-1) from root in the host's pid namespace takes down the whole machine.
            "if any(os.path.exists(f'/proc/{pid}') for pid in host):\n"
            "    print('ESCAPED host pids visible'); raise SystemExit(1)\n"
            "for pid in (os.getppid(), 1, *host):\n"
            "    try:\n"
            "        os.kill(pid, signal.SIGKILL); print('sent', pid)\n"
            "    except OSError as e: print('refused', pid, e.errno)\n"
            "try:\n"  # everything it may signal, itself excepted
            "    os.kill(-1, signal.SIGKILL); print('sent -1')\n"
            "except OSError as e: print('refused -1', e.errno)\n"
            "print('still here')\n"
        )
        assert "still here" in r.stdout and r.stdout.count("refused") >= 3, r.text()
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_a_missing_bubblewrap_is_a_refusal_that_says_how_to_install_it(monkeypatch):
    real_which = sb.shutil.which
    monkeypatch.setattr(sb.shutil, "which", lambda n: None if n == "bwrap" else real_which(n))
    sandbox_problem.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match=r"apt-get install -y bubblewrap"):
            run_python("print('unconfined')")
        with pytest.raises(ToolError, match="bubblewrap"):
            asyncio.run(sb.python_tool().ainvoke({"code": "print('unconfined')"}))
    finally:
        monkeypatch.undo()
        sandbox_problem.cache_clear()
    assert sandbox_problem() is None


# -- the same attacks from an unprivileged uid --------------------------------------------

_USER_CHILD = """
import json, sys
from tools.sandbox import SandboxLimits, SandboxUnavailable, run_python, sandbox_mode
out = {"uid": __import__("os").getuid(), "mode": sandbox_mode()}
try:
    r = run_python(sys.argv[1], SandboxLimits(cpu_s=3, wall_s=12, memory_mb=256, max_processes=16))
    out.update(stdout=r.stdout, stderr=r.stderr, exit=r.exit_code)
except SandboxUnavailable as e:
    out["refused"] = str(e)
print(json.dumps(out))
"""


def _as_nobody(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run argv as uid 65534, in a view of the host where the interpreter and this checkout
    are reachable for that uid (a root-only home folder is replaced by the bits they need)."""
    needed = [*sb._interpreter_dirs(), str(REPO)]
    view = ["bwrap", "--dev-bind", "/", "/", "--die-with-parent"]
    covered: set[str] = set()
    for path in needed:
        parts = Path(path).parts
        for i in range(2, len(parts)):
            ancestor = str(Path(*parts[:i]))
            if not os.stat(ancestor).st_mode & stat.S_IXOTH:
                if ancestor not in covered:
                    covered.add(ancestor)
                    view += ["--perms", "0755", "--tmpfs", ancestor]
                view += sb._parents(path, set(covered) | {"/"}) + ["--ro-bind", path, path]
                break
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
    return subprocess.run(
        view + ["--"] + drop + argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=60
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as another uid")
def test_the_sandbox_holds_for_an_unprivileged_user(workspace: Path):
    secret = "s3cret-" + secrets.token_hex(8)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    mark = f"{secrets.randbelow(10**6) + 10**6}.5"
    attack = (
        "import os, socket, subprocess, time\n"
        f"db, host, port, mark = {str(workspace / 'traces.db')!r}, {os.getpid()}, {port}, {mark!r}\n"
        "print('uid', os.getuid())\n"
        "for p in ['/etc/shadow', db, '/proc/' + str(host) + '/environ']:\n"
        "    try: print('ESCAPED read', p, open(p, 'rb').read(200))\n"
        "    except OSError as e: print('blocked', p)\n"
        "try: socket.create_connection(('127.0.0.1', port), timeout=2); print('ESCAPED net')\n"
        "except OSError: print('blocked net')\n"
        "r = subprocess.run(['unshare', '-Urn', 'true'], capture_output=True)\n"
        "print('blocked unshare' if r.returncode else 'ESCAPED unshare')\n"
        "subprocess.Popen(['setsid', 'sleep', mark])\n"
        "n = 0\n"
        "try:\n"
        "    while n < 400:\n"
        "        if os.fork() == 0: time.sleep(60); os._exit(0)\n"
        "        n += 1\n"
        "except OSError: print('blocked fork after', n)\n"
        "print(dict(os.environ), open('/proc/1/environ', 'rb').read())\n"
    )
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SELFTUNE_PLANTED_SECRET": secret}
    done = _as_nobody([sys.executable, "-c", _USER_CHILD, attack], env)
    try:
        server.accept()
        connected = True
    except OSError:
        connected = False
    server.close()
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["uid"] == 65534 and out["mode"] == "bwrap-user"
    if "refused" in out:  # no unprivileged user namespaces here: the tool must refuse
        assert "user namespaces" in out["refused"]
        return
    text = out["stdout"] + out["stderr"]
    assert "ESCAPED" not in text and not connected, text
    assert text.count("blocked") == 6, text
    assert secret not in text
    assert _host_pids_with(mark) == []


def test_an_unprivileged_user_without_user_namespaces_is_refused(monkeypatch):
    """Where bwrap cannot build the sandbox, the tool refuses and names the fix (bwrap's
    failure is simulated: on this machine it succeeds)."""
    if os.geteuid() == 0:
        monkeypatch.setattr(sb.os, "geteuid", lambda: 1000)  # takes the unprivileged branch
    monkeypatch.setattr(sb, "_sandboxed", _no_userns)
    sandbox_problem.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match="unprivileged user namespaces"):
            run_python("print(1)")
    finally:
        monkeypatch.undo()
        sandbox_problem.cache_clear()


def _no_userns(code: str, limits: SandboxLimits) -> sb._Run:
    # what bwrap 0.8 prints when the kernel refuses it a user namespace
    msg = "bwrap: No permissions to creating new namespace, likely because the kernel does not allow non-privileged user namespaces."
    return sb._Run(started=False, returncode=1, stdout="", stderr=msg, duration_s=0.01)


def test_a_timeout_kills_even_code_that_ignores_sigterm():
    """The wall-clock timeout kills the namespace's pid 1, which takes everything with it."""
    start = time.monotonic()
    r = run_python(
        "import os, signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print(os.getcwd(), flush=True)\n"
        "time.sleep(600)",
        SandboxLimits(wall_s=3),
    )
    assert r.timed_out and time.monotonic() - start < 8
    assert _host_pids_with(r.stdout.split("\n")[0]) == []
