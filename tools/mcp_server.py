"""selftune's own tools as an MCP server (FastMCP, stdio or streamable HTTP).

`build_server(tools)` exposes exactly the given Tools with exactly their JSON schemas: the
low-level list_tools/call_tool handlers are ours, so FastMCP does not re-derive schemas.
Pass extra tools (the agent's `ask_agent`, say) in the list.

On stdio, stdout belongs to the protocol: nothing here prints, and logging goes to stderr.

`python -m tools.mcp_server [--transport stdio|http] [--port N]` serves the built-ins.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import version
from typing import Literal

from mcp import types
from mcp.server.fastmcp import FastMCP

from tools.base import Tool

log = logging.getLogger(__name__)
DEFAULT_PORT = 8765
# every tool answers text; structured clients read it as {"result": "..."}
OUTPUT_SCHEMA = {
    "type": "object",
    "properties": {"result": {"type": "string"}},
    "required": ["result"],
}


def build_server(
    tools: list[Tool],
    name: str = "selftune",
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "WARNING",
) -> FastMCP:
    """A FastMCP server offering `tools`; a ToolError becomes a result with isError=true."""
    by_name: dict[str, Tool] = {}
    for t in tools:
        if t.name in by_name:
            raise ValueError(f"two tools are named {t.name!r}: MCP tool names must be unique")
        by_name[t.name] = t
    server = FastMCP(name, host=host, port=port, log_level=log_level)
    low = server._mcp_server  # the documented way to take over handlers FastMCP set up
    low.version = version("selftune")  # not the SDK's version: clients show it as ours

    async def list_tools() -> list[types.Tool]:
        return [
            types.Tool(
                name=t.name,
                description=t.description,
                inputSchema=t.parameters,
                outputSchema=OUTPUT_SCHEMA,
                annotations=types.ToolAnnotations(title=t.name, **t.hints),
            )
            for t in by_name.values()
        ]

    async def call_tool(tool_name: str, arguments: dict) -> tuple[list[types.TextContent], dict]:
        t = by_name.get(tool_name)
        if t is None:
            raise ValueError(f"unknown tool {tool_name!r}: this server offers {sorted(by_name)}")
        # ainvoke validates (with messages meant for a model) and raises ToolError on failure;
        # the low-level server turns any exception into an isError result with its text.
        text = await t.ainvoke(arguments)
        return [types.TextContent(type="text", text=text)], {"result": text}

    low.list_tools()(list_tools)
    low.call_tool(validate_input=False)(call_tool)
    return server


def serve(
    tools: list[Tool],
    transport: Literal["stdio", "http"] = "stdio",
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    name: str = "selftune",
) -> None:
    """Serve `tools` until interrupted. HTTP serves streamable HTTP at http://host:port/mcp."""
    if transport not in ("stdio", "http"):
        raise ValueError(f"transport must be 'stdio' or 'http', not {transport!r}")
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    server = build_server(tools, name=name, host=host, port=port)
    server.run("stdio" if transport == "stdio" else "streamable-http")


def main(argv: list[str] | None = None) -> None:
    from tools.catalog import builtin_tools

    p = argparse.ArgumentParser(description="Serve selftune's built-in tools over MCP.")
    p.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    a = p.parse_args(argv)
    serve(list(builtin_tools().values()), transport=a.transport, host=a.host, port=a.port)


if __name__ == "__main__":
    main()
