"""MCP with real servers over stdio and HTTP: a third-party npm server, our own server, and
servers that crash, hang or fail to restart."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tools import ToolError
from tools.mcp_client import McpManager, McpStartError, tool_name
from tools.schemas import McpServerConfig

REPO = Path(__file__).resolve().parent.parent
FS_SERVER = (
    REPO / "node_modules" / "@modelcontextprotocol" / "server-filesystem" / "dist" / "index.js"
)


def ours(name: str = "st", **kw) -> McpServerConfig:
    return McpServerConfig(
        name=name, command=sys.executable, args=["-m", "tools.mcp_server"], cwd=str(REPO), **kw
    )


def fs_server(root: Path, **kw) -> McpServerConfig:
    if not FS_SERVER.is_file():
        pytest.fail(
            f"{FS_SERVER} is missing: run `npm install` in {REPO} (make test does it) to get "
            "the third-party MCP filesystem server these tests run against"
        )
    return McpServerConfig(name="fs", command="node", args=[str(FS_SERVER), str(root)], **kw)


def child_pids(marker: str) -> list[int]:
    """Our direct children whose command line contains `marker` (from /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and marker in cmdline:
            pids.append(int(entry))
    return pids


async def until_dead(pid: int, deadline_s: float = 10.0) -> None:
    """Returns once `pid` has exited (a zombie or gone); fails the test after the deadline."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return
        if state in ("Z", "X"):
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"process {pid} still runs {deadline_s:g} s after SIGKILL")


def test_third_party_filesystem_server(tmp_path: Path):
    root = tmp_path / "allowed"
    root.mkdir()
    (root / "notes.txt").write_text("the answer is 42\n")
    (tmp_path / "secret.txt").write_text("outside")
    cfg = fs_server(root, allow=["read_text_file", "list_directory", "write_file"])

    async def main():
        async with McpManager([cfg]) as m:
            tools = {t.name: t for t in m.tools()}
            assert set(tools) == {"fs__read_text_file", "fs__list_directory", "fs__write_file"}
            t = tools["fs__read_text_file"]
            assert t.source == "mcp:fs" and t.server == "fs"
            assert t.schema()["function"]["parameters"]["properties"]["path"]["type"] == "string"
            assert "42" in await t.ainvoke({"path": str(root / "notes.txt")})
            listing = await tools["fs__list_directory"].ainvoke({"path": str(root)})
            assert "notes.txt" in listing
            with pytest.raises(ToolError, match="outside allowed directories"):
                await t.ainvoke({"path": str(tmp_path / "secret.txt")})
            # argument validation happens before the server is asked
            with pytest.raises(ToolError, match="path"):
                await t.ainvoke({})
            await tools["fs__write_file"].ainvoke({"path": str(root / "new.txt"), "content": "hi"})
            assert (root / "new.txt").read_text() == "hi"

    asyncio.run(main())


def test_allow_list_naming_a_missing_tool_is_an_error(tmp_path: Path):
    cfg = fs_server(tmp_path, allow=["read_text_file", "no_such_tool"])
    with pytest.raises(McpStartError, match="no_such_tool"):
        asyncio.run(McpManager([cfg]).start())


def test_our_server_over_stdio_lists_and_calls_builtins():
    async def main():
        async with McpManager([ours()]) as m:
            tools = {t.name: t for t in m.tools()}
            assert set(tools) == {"st__calculator", "st__python"}
            calc = tools["st__calculator"]
            assert calc.parameters["required"] == ["expression"]
            assert await calc.ainvoke({"expression": "2 ** 10 + 0.5"}) == "1024.5"
            with pytest.raises(ToolError, match="division by zero"):
                await calc.ainvoke({"expression": "1/0"})
            out = await tools["st__python"].ainvoke({"code": "print(sum(range(10)))"})
            assert "45" in out
            # the session is held: many calls, one server process
            await asyncio.gather(*(calc.ainvoke({"expression": f"{i}*2"}) for i in range(10)))
            assert len(child_pids("tools.mcp_server")) == 1

    asyncio.run(main())


def test_killed_server_gives_tool_error_then_is_restarted():
    async def main():
        async with McpManager([ours()]) as m:
            calc = {t.name: t for t in m.tools()}["st__calculator"]
            assert await calc.ainvoke({"expression": "1+1"}) == "2"
            (pid,) = child_pids("tools.mcp_server")
            os.kill(pid, signal.SIGKILL)
            await until_dead(pid)
            with pytest.raises(ToolError, match="MCP server 'st' died"):
                await calc.ainvoke({"expression": "2+2"})
            assert m.status()["st"].startswith("restarting")
            assert await calc.ainvoke({"expression": "3+3"}) == "6"
            (new_pid,) = child_pids("tools.mcp_server")
            assert new_pid != pid
            assert m.status()["st"] == "up"

    asyncio.run(main())


def test_a_call_sent_as_the_server_dies_fails_at_once_not_after_its_timeout():
    """The call goes out in the same instant as the SIGKILL, before the session has read the
    server's end: it must fail as a death when the session ends, not wait out timeout_s (under
    xdist it once waited the full 20 s and reported a timeout)."""

    async def main():
        async with McpManager([ours(timeout_s=60)]) as m:
            calc = {t.name: t for t in m.tools()}["st__calculator"]
            assert await calc.ainvoke({"expression": "1+1"}) == "2"
            (pid,) = child_pids("tools.mcp_server")
            t0 = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(ToolError, match="MCP server 'st' died"):
                await calc.ainvoke({"expression": "2+2"})
            assert time.monotonic() - t0 < 15, "the death was noticed only by the timeout"
            assert await calc.ainvoke({"expression": "3+3"}) == "6"

    asyncio.run(main())


FLAKY_SERVER = """
import sys, time
from pathlib import Path
from mcp.server.fastmcp import FastMCP

marker = Path(sys.argv[1])
if marker.exists():
    sys.exit("refusing to start twice")  # the restart fails
marker.write_text("started")
app = FastMCP("flaky")

@app.tool()
def echo(text: str) -> str:
    return text

@app.tool()
def nap(seconds: float) -> str:
    time.sleep(seconds)
    return "rested"

@app.tool()
def fail() -> str:
    raise RuntimeError("this tool always fails")

app.run("stdio")
"""


def flaky(tmp_path: Path, **kw) -> McpServerConfig:
    script = tmp_path / "flaky_server.py"
    script.write_text(textwrap.dedent(FLAKY_SERVER))
    return McpServerConfig(
        name="flaky", command=sys.executable, args=[str(script), str(tmp_path / "marker")], **kw
    )


def test_hung_server_times_out_and_failed_restart_fails_fast(tmp_path: Path):
    # required: under load a slow start must fail the test loudly, not skip the server
    cfg = flaky(tmp_path, timeout_s=5, required=True)

    async def main():
        async with McpManager([cfg, ours()]) as m:
            tools = {t.name: t for t in m.tools()}
            assert await tools["flaky__echo"].ainvoke({"text": "hi"}) == "hi"
            with pytest.raises(ToolError, match="this tool always fails"):
                await tools["flaky__fail"].ainvoke({})
            start = time.monotonic()
            with pytest.raises(ToolError, match=r"MCP server 'flaky' timed out after 5 s"):
                await tools["flaky__nap"].ainvoke({"seconds": 30})
            assert time.monotonic() - start < 8
            # the restart is refused by the server (marker file): the call says so ...
            with pytest.raises(ToolError, match="MCP server 'flaky' is down: restart failed"):
                await tools["flaky__echo"].ainvoke({"text": "again"})
            # ... and later calls fail fast without trying again
            start = time.monotonic()
            with pytest.raises(ToolError, match="is down"):
                await tools["flaky__echo"].ainvoke({"text": "again"})
            assert time.monotonic() - start < 0.1
            # the other server is unaffected
            assert await tools["st__calculator"].ainvoke({"expression": "7*6"}) == "42"

    asyncio.run(main())


def test_a_required_server_that_cannot_start_names_itself(tmp_path: Path):
    bad = McpServerConfig(
        name="broken",
        command=sys.executable,
        args=["-c", "import sys; sys.exit('no config')"],
        required=True,
    )
    with pytest.raises(McpStartError, match="MCP server 'broken' failed to start.*no config"):
        asyncio.run(McpManager([bad]).start())
    missing = McpServerConfig(name="ghost", command=str(tmp_path / "not-there"), required=True)
    with pytest.raises(McpStartError, match="ghost"):
        asyncio.run(McpManager([missing]).start())


def test_a_dead_and_a_hung_server_are_skipped_and_the_third_party_one_works(tmp_path, caplog):
    dead = McpServerConfig(
        name="broken", command=sys.executable, args=["-c", "import sys; sys.exit('no config')"]
    )
    hung = McpServerConfig(
        name="hung", command=sys.executable, args=["-c", "import time; time.sleep(600)"],
        timeout_s=2,
    )  # fmt: skip
    (tmp_path / "note.txt").write_text("hello from the filesystem server")

    async def main():
        async with McpManager([dead, hung, fs_server(tmp_path)]) as m:
            names = {t.name for t in m.tools()}
            assert names and all(n.startswith("fs__") for n in names)
            read = next(t for t in m.tools() if t.name == "fs__read_text_file")
            text = await read.ainvoke({"path": str(tmp_path / "note.txt")})
            assert "hello from the filesystem server" in text
            status = m.status()
            assert status["broken"].startswith("down: ") and "no config" in status["broken"]
            assert "did not start within 2 s" in status["hung"]
            stub = m.unavailable_tool("hung__anything")
            with pytest.raises(ToolError, match="MCP server 'hung' is down"):
                await stub.ainvoke({})
            assert m.unavailable_tool("fs__read_text_file") is None

    with caplog.at_level("WARNING", logger="tools.mcp_client"):
        asyncio.run(main())
    assert "'broken'" in caplog.text and "'hung'" in caplog.text


def test_the_server_timeout_fires_before_the_agents_by_default():
    # otherwise the agent abandons a hung call first and the server is never restarted
    from agent.config import AgentConfig

    assert McpServerConfig(name="x", command="x").timeout_s < AgentConfig().tool_timeout_s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_our_server_over_streamable_http():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.mcp_server", "--transport", "http", "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"http MCP server did not start: {proc.stderr.read().decode()}")
                time.sleep(0.1)
        cfg = McpServerConfig(
            name="web",
            transport="http",
            url=f"http://127.0.0.1:{port}/mcp",
            headers={"X-Test": "1"},
            allow=["calculator"],
        )

        async def main():
            async with McpManager([cfg]) as m:
                (calc,) = m.tools()
                assert calc.name == "web__calculator" and calc.source == "mcp:web"
                assert await calc.ainvoke({"expression": "0.1 + 0.2"}) == "0.3"

        asyncio.run(main())
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_tool_names_are_valid_function_names():
    assert tool_name("fs", "read_file") == "fs__read_file"
    assert tool_name("my-srv", "ns.tool/x") == "my-srv__ns_tool_x"


def test_our_server_names_its_version_and_annotates_its_tools():
    from importlib.metadata import version

    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    params = StdioServerParameters(
        command=sys.executable, args=["-m", "tools.mcp_server"], cwd=str(REPO)
    )

    async def main():
        async with stdio_client(params) as (read, write), ClientSession(read, write) as s:
            init = await s.initialize()
            assert init.serverInfo.version == version("selftune")
            listed = {t.name: t for t in (await s.list_tools()).tools}
            calc = listed["calculator"]
            assert calc.annotations.readOnlyHint and calc.annotations.idempotentHint
            assert calc.outputSchema["required"] == ["result"]
            result = await s.call_tool("calculator", {"expression": "6*7"})
            assert result.structuredContent == {"result": "42"} and not result.isError

    asyncio.run(main())
