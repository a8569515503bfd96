"""Built-in environment: questions about the invented Quillmoor Robotics handbook in corpus/.

The facts are made up, so a model can only answer them by calling `search` over the corpus
(the runner indexes `corpus/` into the Chroma collection named in COLLECTION).
"""

NAME = "docs-qa"
SYSTEM_PROMPT = (
    "You answer questions about the company Quillmoor Robotics. Call the search tool to find "
    "the answer in the company handbook, then answer briefly using what it returned."
)
TOOL_NAMES = ["search"]
GRADER = "contains"  # the numeric questions set "grader": "numeric" on their own line
REQUIRES_TOOLS = ["search"]
CORPUS = "corpus"
COLLECTION = "env-docs-qa"
