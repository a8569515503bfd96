"""Tools: the Tool abstraction, built-ins, the MCP client and server."""

from tools.base import Tool, ToolError, tool
from tools.registry import ToolLoadError, builtin_tools, load_module_tools, resolve_tools

__all__ = [
    "Tool",
    "ToolError",
    "ToolLoadError",
    "builtin_tools",
    "load_module_tools",
    "resolve_tools",
    "tool",
]
