"""MCP client: one long-lived session per configured server, its tools as selftune Tools.

Each server gets an owner task that opens the transport (stdio subprocess or streamable
HTTP) and the `ClientSession` inside one AsyncExitStack and keeps them open until the
manager closes: anyio's cancel scopes must be entered and left in the same task, and a
server started per call costs ~0.7 s where a held session answers in a few ms.

Tool names are `<server>__<tool>` (valid for OpenAI-style tool calling: ^[a-zA-Z0-9_-]+$).

Failures: a server that is down or hangs at start is skipped with a warning (unless it is
`required`): the agent works with the others, and a call to one of its tools is a ToolError
naming the server. A call that times out, or whose server has died, is a ToolError naming the
server. The server is restarted on the next call; if that restart fails, the server is
marked down and its later calls fail fast. Other servers are unaffected.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import tempfile
from contextlib import AsyncExitStack
from typing import IO, Any

import anyio
import jsonschema
from mcp import ClientSession, McpError, StdioServerParameters, types
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from tools.base import Tool, ToolError
from tools.errors import SelftuneError
from tools.schemas import McpServerConfig

log = logging.getLogger(__name__)
SEPARATOR = "__"
_STOP_GRACE_S = 5.0
_CONNECTION_LOST = (
    anyio.ClosedResourceError,
    anyio.BrokenResourceError,
    anyio.EndOfStream,
    BrokenPipeError,
    ConnectionError,
)


class McpStartError(SelftuneError, RuntimeError):
    """A configured MCP server could not be started or listed; the message names it."""


def tool_name(server: str, name: str) -> str:
    """`<server>__<tool>` with any character a tool-calling API refuses replaced by '_'."""
    return re.sub(r"[^a-zA-Z0-9_-]", "_", f"{server}{SEPARATOR}{name}")[:64]


def content_text(content: list[Any]) -> str:
    """MCP content blocks as text: text joined, other kinds described in brackets."""
    parts = []
    for c in content:
        if isinstance(c, types.TextContent):
            parts.append(c.text)
        elif isinstance(c, types.ImageContent | types.AudioContent):
            kind = "image" if isinstance(c, types.ImageContent) else "audio"
            parts.append(f"[{kind}: {c.mimeType}, {len(c.data) * 3 // 4} bytes]")
        elif isinstance(c, types.ResourceLink):
            parts.append(f"[resource link: {c.uri} ({c.name})]")
        elif isinstance(c, types.EmbeddedResource):
            r = c.resource
            if isinstance(r, types.TextResourceContents):
                parts.append(r.text)
            else:
                parts.append(f"[resource: {r.uri}, {r.mimeType or 'binary'}]")
        else:
            parts.append(f"[{getattr(c, 'type', type(c).__name__)} content]")
    return "\n".join(parts)


class _SessionEnded(SelftuneError):
    """The session to a server ended while a call waited on it; the message says why."""


class _Server:
    """One server: its config, the owner task holding the session, and its health."""

    def __init__(self, cfg: McpServerConfig):
        self.cfg = cfg
        self.session: ClientSession | None = None
        self.listed: list[types.Tool] = []
        self.task: asyncio.Task | None = None
        self.stop = asyncio.Event()
        self.generation = (
            0  # bumps on every (re)start, so a stale failure cannot kill a new session
        )
        self.broken: str | None = None  # why the current session is unusable (restart on next call)
        self.down: str | None = None  # a restart failed: calls fail fast with this reason
        self.lock = asyncio.Lock()
        self.errlog: IO[bytes] = tempfile.TemporaryFile()  # the server's stderr, for messages

    def stderr_tail(self, chars: int = 600) -> str:
        fd = self.errlog.fileno()
        size = os.fstat(fd).st_size
        data = os.pread(fd, chars, max(0, size - chars))
        return data.decode("utf-8", errors="replace").strip()

    async def connect(self) -> None:
        """Start the owner task and wait until the session is initialised and tools listed."""
        self.stop = asyncio.Event()
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.task = asyncio.create_task(self._own(ready), name=f"mcp:{self.cfg.name}")
        try:
            await asyncio.wait_for(asyncio.shield(ready), timeout=self.cfg.timeout_s)
        except TimeoutError:
            await self.close()
            raise McpStartError(
                f"MCP server '{self.cfg.name}' did not start within {self.cfg.timeout_s:g} s"
                + self._stderr_hint()
            ) from None
        except McpStartError:
            await self.close()
            raise
        self.generation += 1
        self.broken = None
        self.down = None

    async def _own(self, ready: asyncio.Future[None]) -> None:
        try:
            async with AsyncExitStack() as stack:
                read, write = await self._open_transport(stack)
                session = await stack.enter_async_context(ClientSession(read, write))
                await session.initialize()
                listed: list[types.Tool] = []
                cursor = None
                while True:
                    page = (
                        await session.list_tools(cursor=cursor)
                        if cursor
                        else await session.list_tools()
                    )
                    listed.extend(page.tools)
                    cursor = page.nextCursor
                    if not cursor:
                        break
                self.listed, self.session = listed, session
                ready.set_result(None)
                await self.stop.wait()
        except asyncio.CancelledError:
            if not ready.done():
                ready.set_exception(McpStartError(f"MCP server '{self.cfg.name}' start cancelled"))
            raise
        except BaseException as e:  # noqa: BLE001 - anyio raises groups; all mean the same here
            reason = _explain(e)
            if not ready.done():
                ready.set_exception(
                    McpStartError(
                        f"MCP server '{self.cfg.name}' failed to start: {reason}"
                        + self._stderr_hint()
                    )
                )
            else:
                self.broken = self.broken or f"died: {reason}"
                log.warning("MCP server %r session ended: %s", self.cfg.name, reason)
        finally:
            self.session = None

    async def _open_transport(self, stack: AsyncExitStack):
        cfg = self.cfg
        if cfg.transport == "stdio":
            if not cfg.command:
                raise McpStartError(f"MCP server '{cfg.name}': stdio transport needs `command`")
            params = StdioServerParameters(
                command=cfg.command,
                args=cfg.args,
                env={**_base_env(), **cfg.env},
                cwd=cfg.cwd,
            )
            read, write = await stack.enter_async_context(stdio_client(params, errlog=self.errlog))
            return read, write
        if not cfg.url:
            raise McpStartError(f"MCP server '{cfg.name}': http transport needs `url`")
        client = await stack.enter_async_context(create_mcp_http_client(headers=cfg.headers))
        read, write, _ = await stack.enter_async_context(
            streamable_http_client(cfg.url, http_client=client)
        )
        return read, write

    async def close(self) -> None:
        task, self.task = self.task, None
        if task is None:
            return
        self.stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=_STOP_GRACE_S)
        except (TimeoutError, Exception):  # noqa: BLE001 - closing must not fail
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    def _stderr_hint(self) -> str:
        tail = self.stderr_tail()
        return f". Its stderr ends with: {tail}" if tail else ""

    async def call(self, name: str, arguments: dict[str, Any]) -> str:
        await self._ensure_up()
        session, gen = self.session, self.generation
        label = f"MCP server '{self.cfg.name}'"
        if session is None:
            self.broken = self.broken or "died: the session is closed"
            raise ToolError(f"{label} {self.broken}; it will be restarted for the next call")
        try:
            result = await self._call_while_up(session.call_tool(name, arguments), gen)
        except TimeoutError:
            self._mark_broken(gen, f"timed out after {self.cfg.timeout_s:g} s")
            raise ToolError(
                f"{label} timed out after {self.cfg.timeout_s:g} s calling '{name}'; "
                "it will be restarted for the next call"
            ) from None
        except McpError as e:
            if e.error.code == types.CONNECTION_CLOSED:
                self._mark_broken(gen, f"died: {e.error.message}")
                raise ToolError(
                    f"{label} died during '{name}': {e.error.message}{self._stderr_hint()}; "
                    "it will be restarted for the next call"
                ) from None
            raise ToolError(f"{label} refused '{name}': {e.error.message}") from None
        except _SessionEnded as e:
            raise ToolError(
                f"{label} died during '{name}': {e}{self._stderr_hint()}; "
                "it will be restarted for the next call"
            ) from None
        except _CONNECTION_LOST as e:
            self._mark_broken(gen, f"died: {_explain(e)}")
            raise ToolError(
                f"{label} died during '{name}': {_explain(e)}{self._stderr_hint()}; "
                "it will be restarted for the next call"
            ) from None
        text = content_text(result.content)
        if not text and result.structuredContent is not None:
            text = json.dumps(result.structuredContent, ensure_ascii=False)
        if result.isError:
            raise ToolError(f"{label} tool '{name}' returned an error: {text or '(no message)'}")
        return text

    async def _call_while_up(self, request: Any, gen: int) -> Any:
        """Await `request` until it answers, times out (TimeoutError), or the session ends
        under it. The last matters: the SDK leaves a request that was in flight, or sent into a
        pipe whose server had just been killed, waiting for its full timeout although the
        session already knows the server is gone (seen under load: 20 s instead of at once)."""
        call = asyncio.ensure_future(request)
        owner = self.task
        waiting = {call} if owner is None else {call, owner}
        try:
            done, _ = await asyncio.wait(
                waiting, timeout=self.cfg.timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        except BaseException:
            call.cancel()
            raise
        if call in done:
            return call.result()
        call.cancel()
        await asyncio.wait({call})  # let it unwind; wait() raises nothing of the call's
        if not done:
            raise TimeoutError
        reason = self.broken or "died: the session ended"
        self._mark_broken(gen, reason)
        raise _SessionEnded(reason.removeprefix("died: "))

    def _mark_broken(self, gen: int, reason: str) -> None:
        if gen == self.generation:
            self.broken = reason

    async def _ensure_up(self) -> None:
        if self.down:
            raise ToolError(f"MCP server '{self.cfg.name}' is down: {self.down}")
        if not self.broken:
            return
        async with self.lock:
            if self.down:
                raise ToolError(f"MCP server '{self.cfg.name}' is down: {self.down}")
            if not self.broken:
                return  # another call restarted it while we waited
            log.warning("restarting MCP server %r (%s)", self.cfg.name, self.broken)
            await self.close()
            try:
                await self.connect()
            except McpStartError as e:
                self.down = f"restart failed ({e}); fix the server and restart selftune"
                raise ToolError(f"MCP server '{self.cfg.name}' is down: {self.down}") from None


class McpManager:
    """Holds a session open to each configured MCP server; `tools()` are their tools.

    Use `async with McpManager(servers) as m:` (or `await m.start()` ... `await m.aclose()`).
    """

    def __init__(self, servers: list[McpServerConfig]):
        names = [s.name for s in servers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"MCP server names must be unique; repeated: {dupes}")
        self._servers = {s.name: _Server(s) for s in servers}
        self._tools: list[Tool] = []
        self._started = False

    async def start(self) -> None:
        """Start every server (concurrently) and list its tools.

        A server that fails to start is marked down and skipped with a warning naming it;
        McpStartError (naming every failed server, the others closed again) only when a
        `required` one failed.
        """
        servers = list(self._servers.values())
        results = await asyncio.gather(*(s.connect() for s in servers), return_exceptions=True)
        failed = [
            (s, r) for s, r in zip(servers, results, strict=True) if isinstance(r, BaseException)
        ]
        if any(s.cfg.required for s, _ in failed):
            await self.aclose()
            raise McpStartError("; ".join(str(r) for _, r in failed))
        for srv, error in failed:
            srv.down = f"it did not start ({error}); fix the server and restart selftune"
            log.warning("%s; its tools are unavailable", error)
        try:
            self._tools = [
                t for s in self._servers.values() if not s.down for t in self._server_tools(s)
            ]
        except McpStartError:
            await self.aclose()
            raise
        self._started = True

    def unavailable_tool(self, name: str) -> Tool | None:
        """For `<server>__<tool>` of a server that is down, a tool whose every call is a
        ToolError naming the server and why (so a task that asks for it still runs)."""
        server = name.split(SEPARATOR, 1)[0] if SEPARATOR in name else None
        srv = self._servers.get(server or "")
        if srv is None or not srv.down:
            return None

        async def run(**_: Any) -> str:
            raise ToolError(f"MCP server '{srv.cfg.name}' is down: {srv.down}")

        return Tool(
            name=name,
            description=f"(unavailable: MCP server '{srv.cfg.name}' is down)",
            parameters={"type": "object"},
            func=run,
            source=f"mcp:{srv.cfg.name}",
            server=srv.cfg.name,
        )

    def _server_tools(self, srv: _Server) -> list[Tool]:
        cfg = srv.cfg
        offered = {t.name: t for t in srv.listed}
        if cfg.allow is not None:
            unknown = sorted(set(cfg.allow) - set(offered))
            if unknown:
                raise McpStartError(
                    f"MCP server '{cfg.name}' has no tool(s) {unknown} named in `allow`; "
                    f"it offers {sorted(offered)}"
                )
            offered = {n: t for n, t in offered.items() if n in cfg.allow}
        out = []
        for name, t in offered.items():
            schema = dict(t.inputSchema or {})
            schema.setdefault("type", "object")
            try:
                jsonschema.Draft202012Validator.check_schema(schema)
            except jsonschema.SchemaError as e:
                log.warning(
                    "MCP tool %s/%s has an invalid schema (%s); not validating",
                    cfg.name,
                    name,
                    e.message,
                )
                schema = {"type": "object"}

            out.append(
                Tool(
                    name=tool_name(cfg.name, name),
                    description=t.description or t.title or name,
                    parameters=schema,
                    func=_caller(srv, name),
                    source=f"mcp:{cfg.name}",
                    server=cfg.name,
                )
            )
        return out

    def tools(self) -> list[Tool]:
        """The allowed tools of every server, named `<server>__<tool>`."""
        if not self._started:
            raise RuntimeError(
                "McpManager.tools() before start(): use `async with McpManager(...)`"
            )
        return list(self._tools)

    def status(self) -> dict[str, str]:
        """Each server's state: 'up', 'restarting on next call: <why>' or 'down: <why>'."""
        out = {}
        for name, s in self._servers.items():
            if s.down:
                out[name] = f"down: {s.down}"
            elif s.broken:
                out[name] = f"restarting on next call: {s.broken}"
            else:
                out[name] = "up" if s.session is not None else "not started"
        return out

    def stderr_tail(self, server: str, chars: int = 2000) -> str:
        """The end of a stdio server's stderr (empty for http servers)."""
        return self._servers[server].stderr_tail(chars)

    async def aclose(self) -> None:
        """Close every session (stdio servers are asked to exit, then terminated)."""
        await asyncio.gather(*(s.close() for s in self._servers.values()), return_exceptions=True)
        self._started = False

    async def __aenter__(self) -> McpManager:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _caller(srv: _Server, name: str):
    async def run(**arguments: Any) -> str:
        return await srv.call(name, arguments)

    return run


def _base_env() -> dict[str, str]:
    # mcp passes only a few variables (HOME, PATH, ...) to a stdio server; keep those and
    # what a Python or node server commonly needs to find its packages.
    from mcp.client.stdio import get_default_environment

    env = get_default_environment()
    for k in ("PYTHONPATH", "VIRTUAL_ENV", "NODE_PATH", "SELFTUNE_HOME", "HF_HUB_OFFLINE"):
        if k in os.environ:
            env[k] = os.environ[k]
    return env


def _explain(e: BaseException) -> str:
    """The innermost useful message of a (possibly grouped) exception."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    msg = str(e) or type(e).__name__
    return f"{type(e).__name__}: {msg}" if msg != type(e).__name__ else msg
