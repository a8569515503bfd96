"""Built-in environment: harder word problems, many with a step that is not in the text
(12 months in a year, 3600 seconds in an hour, a price after a discount). The base SmolLM2
cannot show most of them even with demonstrations, so self-training from its own traces
plateaus here: the environment for comparing SFT with GRPO.

Same prompt, tool and grader as calculator; only the tasks differ."""

from agent.envs.calculator.environment import (  # noqa: F401 - read by the loader
    GRADER,
    REQUIRES_TOOLS,
    SYSTEM_PROMPT,
    TOOL_NAMES,
)

NAME = "word-problems"
