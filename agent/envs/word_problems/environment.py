"""Built-in environment: harder word problems, many with a step that is not in the text
(12 months in a year, 3600 seconds in an hour, a price after a discount). The base SmolLM2
cannot show most of them even with demonstrations, so self-training from its own traces
plateaus here: the environment for comparing SFT with GRPO (issue #8)."""

NAME = "word-problems"
SYSTEM_PROMPT = (
    "You are a careful assistant. For any arithmetic, call the calculator tool and use its "
    "result; then give the final answer as a number."
)
TOOL_NAMES = ["calculator"]
GRADER = "numeric"
REQUIRES_TOOLS = ["calculator"]
