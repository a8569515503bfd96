"""Tools: the Tool abstraction, built-ins, the MCP client and server."""

from tools.base import Tool, ToolError, tool
from tools.catalog import ToolLoadError, builtin_tools, load_module_tools, local_tools

__all__ = [
    "Tool",
    "ToolError",
    "ToolLoadError",
    "builtin_tools",
    "load_module_tools",
    "local_tools",
    "tool",
]
