"""Built-in environment: arithmetic word problems that need the calculator to be right."""

NAME = "calculator"
SYSTEM_PROMPT = (
    "You are a careful assistant. For any arithmetic, call the calculator tool and use its "
    "result; then give the final answer as a number."
)
TOOL_NAMES = ["calculator"]
GRADER = "numeric"
REQUIRES_TOOLS = ["calculator"]
