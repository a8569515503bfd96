"""`selftune tools | mcp | index | search`: tools, MCP and retrieval.

- `selftune tools list` / `selftune tools call NAME 'JSON'` (tools_app)
- `selftune mcp serve [--transport stdio|http] [--port N]` (mcp_app)
- `selftune index PATH... [--collection NAME]` (index_cmd)
- `selftune search "QUERY" [--collection NAME] [-k N]` (search_cmd)
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from agent.cli.common import command_group, get_config, out
from agent.cli.common import console as err
from agent.workspace import call_tool, open_tools
from tools import Tool, ToolError, local_tools

tools_app = command_group("List and call the agent's tools.")
mcp_app = command_group("Serve selftune's tools over MCP.")


@tools_app.command("list")
def list_cmd(
    ctx: typer.Context,
    mcp: Annotated[
        bool, typer.Option(help="Also start the [[mcp]] servers and list their tools.")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the OpenAI tool schemas.")] = False,
) -> None:
    """List the tools the agent can use."""
    cfg = get_config(ctx)

    async def run() -> list[Tool]:
        async with open_tools(cfg, with_mcp=mcp) as tools:
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
    ctx: typer.Context,
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
        print(asyncio.run(call_tool(get_config(ctx), name, args)))
    except ToolError as e:
        err.print(f"[red]tool error:[/red] {e}")
        raise typer.Exit(1) from None


@mcp_app.command("serve")
def serve_cmd(
    ctx: typer.Context,
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

    cfg = get_config(ctx)
    tools = [*local_tools(cfg.agent.tool_modules).values(), ask_agent_tool(cfg)]
    serve(tools, transport=transport, host=host, port=port)  # type: ignore[arg-type]


def index_cmd(
    ctx: typer.Context,
    paths: Annotated[list[Path], typer.Argument(help="Files or folders to index.")],
    collection: Annotated[
        str | None, typer.Option(help="Collection name (default: [retrieval] collection).")
    ] = None,
) -> None:
    """Index documents (.md, .txt, .html) into the retrieval store; unchanged files are skipped."""
    from rich.progress import Progress

    from retrieval import get_collection, index_paths, open_client

    cfg = get_config(ctx)
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
    ctx: typer.Context,
    query: Annotated[str, typer.Argument(help="What to look for.")],
    collection: Annotated[
        str | None, typer.Option(help="Collection name (default: [retrieval] collection).")
    ] = None,
    k: Annotated[int | None, typer.Option("-k", help="How many passages (default: top_k).")] = None,
) -> None:
    """Search the retrieval store and print what the agent would see."""
    from retrieval import format_passages, get_collection, open_client, search

    cfg = get_config(ctx)
    rc = cfg.retrieval
    col = get_collection(open_client(rc, cfg.workspace.chroma), collection or rc.collection)
    try:
        passages = search(col, query, k or rc.top_k, rc.ranking, rc.passage)
    except ValueError as e:
        err.print(str(e))
        raise typer.Exit(2) from None
    print(format_passages(passages))
