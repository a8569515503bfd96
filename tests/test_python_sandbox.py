"""The python tool's sandbox: limits on CPU, memory, wall time and network, for real."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from tools import ToolError
from tools.sandbox import SandboxLimits, python_tool, run_python, sandbox_mode

LIMITS = SandboxLimits(cpu_s=2, wall_s=6, memory_mb=256, output_chars=1000)


def test_normal_code_returns_output_and_runs_in_a_fresh_folder():
    r = run_python(
        "import os\nprint('hi', 6 * 7)\nprint(os.listdir('.'))\nopen('f', 'w').write('x')", LIMITS
    )
    assert r.ok and r.exit_code == 0
    assert r.stdout.splitlines() == ["hi 42", "[]"]
    text = asyncio.run(python_tool(LIMITS).ainvoke({"code": "import json; print(json.dumps([1]))"}))
    assert text.startswith("exit status 0") and "[1]" in text


def test_error_exit_is_a_tool_error_with_traceback():
    with pytest.raises(ToolError, match=r"(?s)exit status 1.*ZeroDivisionError"):
        asyncio.run(python_tool(LIMITS).ainvoke({"code": "print('before')\n1/0"}))


def test_infinite_loop_is_stopped_by_the_cpu_limit():
    start = time.monotonic()
    r = run_python("while True:\n    pass", LIMITS)
    # the CPU limit, not the wall clock, stopped it (on a loaded machine 2 s of CPU take more
    # than 2 s of wall time, so the wall bound is the wall limit's)
    assert time.monotonic() - start < LIMITS.wall_s + 2
    assert not r.ok and "CPU time" in r.killed_by and not r.timed_out
    assert "limit exceeded" in r.text()


def test_sleeping_code_is_stopped_by_the_wall_clock():
    start = time.monotonic()
    r = run_python("import time\ntime.sleep(60)", LIMITS)
    assert time.monotonic() - start < LIMITS.wall_s + 2
    assert r.timed_out and "wall-clock timeout" in r.text()


def test_memory_bomb_is_stopped_by_the_memory_limit():
    start = time.monotonic()
    r = run_python("x = []\nwhile True:\n    x.append(bytearray(10**7))", LIMITS)
    assert time.monotonic() - start < LIMITS.wall_s
    assert not r.ok and r.killed_by and "memory" in r.killed_by.lower()


def test_network_is_unreachable_even_to_localhost():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    accepted = []
    server.settimeout(8)
    t = threading.Thread(target=lambda: accepted.append(_accept(server)), daemon=True)
    t.start()
    # the same connection from the host succeeds, so the port really is open
    code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)\nprint('connected')"
    r = run_python(code, LIMITS)
    assert not r.ok, r.text()
    assert "connected" not in r.stdout
    # the sandbox's own loopback: nothing listens there, and the host's is out of reach
    assert "connection refused" in r.stderr.lower()
    assert sandbox_mode() in ("bwrap-root", "bwrap-user") and r.sandbox == sandbox_mode()
    socket.create_connection(("127.0.0.1", port), timeout=3).close()
    t.join(timeout=5)
    assert accepted == [True]
    server.close()


def _accept(server: socket.socket) -> bool:
    try:
        conn, _ = server.accept()
        conn.close()
        return True
    except OSError:
        return False


def test_output_is_truncated():
    r = run_python("print('a' * 50000)", LIMITS)
    assert r.ok and len(r.stdout) < 1100 and "truncated: 50001 bytes" in r.stdout


def test_the_temporary_folder_is_removed():
    r = run_python("import os; print(os.getcwd())", LIMITS)
    import os

    cwd = r.stdout.strip()
    assert "selftune-py-" in cwd and not os.path.exists(cwd)
