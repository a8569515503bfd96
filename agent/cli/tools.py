"""CLI commands for tools, MCP and retrieval; agent/cli/__init__.py mounts them.

- `selftune tools list` / `selftune tools call NAME 'JSON'` (tools_app)
- `selftune mcp serve [--transport stdio|http] [--port N]` (mcp_app)
- `selftune index PATH... [--collection NAME]` (index_cmd)
- `selftune search "QUERY" [--collection NAME] [-k N]` (search_cmd)
"""

from __future__ import annotations

import asyncio
import json
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from agent.cli.common import current_config
from agent.config import Config
from tools import Tool, ToolError, builtin_tools, load_module_tools
from tools.mcp_client import McpManager

tools_app = typer.Typer(help="List and call the agent's tools.", no_args_is_help=True)
mcp_app = typer.Typer(help="Serve selftune's tools over MCP.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)


def local_tools(cfg: Config) -> dict[str, Tool]:
    """Built-ins plus the tools of `[agent] tool_modules` (no MCP servers started)."""
    tools = dict(builtin_tools())
    for module in cfg.agent.tool_modules:
        for t in load_module_tools(module):
            tools[t.name] = t
    return tools


@asynccontextmanager
async def all_tools(cfg: Config, with_mcp: bool = True):
    """Every tool the agent could use, MCP servers' included (sessions open for the block)."""
    tools = local_tools(cfg)
    if with_mcp and cfg.mcp:
        async with McpManager(cfg.mcp) as manager:
            yield {**tools, **{t.name: t for t in manager.tools()}}
    else:
        yield tools


async def call_tool(cfg: Config, name: str, arguments: dict) -> str:
    """Call one tool by name (starting MCP servers only if the name is an MCP tool's)."""
    async with all_tools(cfg, with_mcp="__" in name) as tools:
        if name not in tools:
            raise ToolError(f"unknown tool {name!r}: available are {sorted(tools)}")
        return await tools[name].ainvoke(arguments)


@tools_app.command("list")
def list_cmd(
    mcp: Annotated[
        bool, typer.Option(help="Also start the [[mcp]] servers and list their tools.")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the OpenAI tool schemas.")] = False,
) -> None:
    """List the tools the agent can use."""
    cfg = current_config()

    async def run() -> list[Tool]:
        async with all_tools(cfg, with_mcp=mcp) as tools:
            return list(tools.values())

    tools = asyncio.run(run())
    if as_json:
        print(json.dumps([t.schema() for t in tools], indent=2))
        return
    table = Table("name", "source", "parameters", "description")
    for t in tools:
        params = ", ".join(t.parameters.get("properties", {}))
        table.add_row(t.name, t.source, params, t.description.splitlines()[0][:80])
    out.print(table)


@tools_app.command("call")
def call_cmd(
    name: Annotated[str, typer.Argument(help="The tool's name (see `selftune tools list`).")],
    arguments: Annotated[str, typer.Argument(help="The arguments as a JSON object.")] = "{}",
) -> None:
    """Call a tool with JSON arguments and print its result."""
    try:
        args = json.loads(arguments)
    except json.JSONDecodeError as e:
        err.print(f"arguments are not valid JSON ({e}): pass an object like '{{\"x\": 1}}'")
        raise typer.Exit(2) from None
    try:
        print(asyncio.run(call_tool(current_config(), name, args)))
    except ToolError as e:
        err.print(f"[red]tool error:[/red] {e}")
        raise typer.Exit(1) from None


@mcp_app.command("serve")
def serve_cmd(
    transport: Annotated[
        str, typer.Option(help="stdio, or http (streamable HTTP at /mcp).")
    ] = "stdio",
    host: Annotated[str, typer.Option(help="Address for http.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port for http.")] = 8765,
) -> None:
    """Serve the built-in and module tools over MCP."""
    from tools.mcp_server import serve

    if transport not in ("stdio", "http"):
        err.print(f"--transport must be stdio or http, not {transport!r}")
        raise typer.Exit(2)
    from agent.agent import ask_agent_tool

    cfg = current_config()
    tools = [*local_tools(cfg).values(), ask_agent_tool(cfg)]
    serve(tools, transport=transport, host=host, port=port)  # type: ignore[arg-type]


def index_cmd(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders to index.")],
    collection: Annotated[
        str | None, typer.Option(help="Collection name (default: [retrieval] collection).")
    ] = None,
) -> None:
    """Index documents (.md, .txt, .html) into the retrieval store; unchanged files are skipped."""
    from rich.progress import Progress

    from retrieval import get_collection, index_paths, open_client

    cfg = current_config()
    rc = cfg.retrieval
    col = get_collection(open_client(rc, cfg.workspace.chroma), collection or rc.collection)
    with Progress(console=err, transient=True) as progress:
        task = progress.add_task("indexing", total=None)

        def on_file(path: str, what: str) -> None:
            progress.update(task, advance=1, description=f"{what}: {Path(path).name}")

        try:
            report = index_paths(paths, col, rc.chunk_chars, rc.chunk_overlap, on_file=on_file)
        except FileNotFoundError as e:
            err.print(str(e))
            raise typer.Exit(2) from None
    out.print(f"collection '{col.name}': {report.summary()}")
    for path in report.unsupported:
        err.print(f"[yellow]not indexed[/yellow] (unsupported format; PDFs are not read): {path}")


def search_cmd(
    query: Annotated[str, typer.Argument(help="What to look for.")],
    collection: Annotated[
        str | None, typer.Option(help="Collection name (default: [retrieval] collection).")
    ] = None,
    k: Annotated[int | None, typer.Option("-k", help="How many passages (default: top_k).")] = None,
) -> None:
    """Search the retrieval store and print what the agent would see."""
    from retrieval import format_passages, get_collection, open_client, search

    cfg = current_config()
    rc = cfg.retrieval
    col = get_collection(open_client(rc, cfg.workspace.chroma), collection or rc.collection)
    try:
        passages = search(col, query, k or rc.top_k)
    except ValueError as e:
        err.print(str(e))
        raise typer.Exit(2) from None
    print(format_passages(passages))


if __name__ == "__main__":  # pragma: no cover - for trying the commands before cli.py mounts them
    app = typer.Typer()
    app.add_typer(tools_app, name="tools")
    app.add_typer(mcp_app, name="mcp")
    app.command("index")(index_cmd)
    app.command("search")(search_cmd)
    app(sys.argv[1:])
