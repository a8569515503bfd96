"""Built-in environment: the orchestrator hands a lookup to the `researcher` subagent (which
searches the docs-qa handbook) and computes with the result."""

NAME = "delegate"
SYSTEM_PROMPT = (
    "You are an orchestrator. Ask the researcher subagent to look facts up in the company "
    "handbook, then use the calculator for the arithmetic, and give the final answer as a number."
)
TOOL_NAMES = ["researcher", "calculator"]
GRADER = "numeric"
REQUIRES_TOOLS = ["researcher", "calculator"]
SUBAGENTS = [
    {
        "name": "researcher",
        "description": (
            "Looks a fact up in the Quillmoor Robotics handbook and reports it. "
            "Give it the question to answer as `task`."
        ),
        "system_prompt": (
            "You are a researcher. Call the search tool to find the fact you are asked for in "
            "the Quillmoor Robotics handbook, then reply with that fact in one sentence."
        ),
        "tools": ["search"],
    }
]
CORPUS = "../docs_qa/corpus"
COLLECTION = "env-docs-qa"  # shares the docs-qa index
