"""The catalog of local tools: the built-ins by name, and the tools defined in user modules.
(MCP tools come from `tools.mcp_client`; the agent pools both.)"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Sequence

from tools.base import Tool
from tools.builtins import calculator_tool
from tools.errors import SelftuneError
from tools.sandbox import python_tool


class ToolLoadError(SelftuneError, ImportError):
    """A tool module could not be imported or holds no tools; the message says which and why."""


def builtin_tools() -> dict[str, Tool]:
    """The built-in tools by name: calculator and python (search lives in retrieval/)."""
    tools = [calculator_tool(), python_tool()]
    return {t.name: t for t in tools}


def load_module_tools(module_name: str) -> list[Tool]:
    """Every `Tool` (including `@tool`-decorated functions) defined in `module_name`.

    Raises ToolLoadError naming the module if it fails to import or defines no tools.
    """
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is reported the same way
        raise ToolLoadError(
            f"tool module {module_name!r} (from [agent] tool_modules) failed to import: "
            f"{type(e).__name__}: {e}. Check that it is on PYTHONPATH and imports cleanly."
        ) from e
    found: list[Tool] = []
    for attr, value in inspect.getmembers(module):
        if attr.startswith("_") or not isinstance(value, Tool):
            continue
        if value.source == "builtin":
            value.source = f"module:{module_name}"
        found.append(value)
    if not found:
        raise ToolLoadError(
            f"tool module {module_name!r} defines no tools: decorate functions with "
            "`@tools.tool` or create `Tool` objects at module level"
        )
    names = [t.name for t in found]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ToolLoadError(f"tool module {module_name!r} defines {sorted(dupes)} more than once")
    return found


def local_tools(modules: Sequence[str] = ()) -> dict[str, Tool]:
    """The built-ins plus every tool of the user `modules`, by name (no MCP server started)."""
    found = builtin_tools()
    for module in modules:
        found.update({t.name: t for t in load_module_tools(module)})
    return found
