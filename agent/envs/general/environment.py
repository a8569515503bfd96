"""Built-in probe: plain questions that need no tool, so that an adapter which breaks chat
(or answers everything with a tool call) is caught by the gate's general-ability guard."""

NAME = "general"
SYSTEM_PROMPT = "You are a helpful assistant. Answer the question briefly."
TOOL_NAMES: list[str] = []
GRADER = "contains"
