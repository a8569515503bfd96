"""A user environment unlike the built-ins: day counts between two dates, with its own
two-argument tool. It is the environment the improve evidence uses for "a folder a user brings
with tasks.jsonl and two demonstrations" (see make.py for how the tasks were written)."""

from datetime import date, datetime

from tools import ToolError, tool

NAME = "date-gaps"
SYSTEM_PROMPT = (
    "You answer questions about dates. Count days with the days_between tool, then give the "
    "number of days."
)
FORMATS = ("%Y-%m-%d", "%B %d, %Y", "%d %B %Y", "%b %d, %Y", "%d %b %Y")


def _parse(text: str) -> date:
    text = " ".join(str(text).replace(",", ", ").split()).replace(" ,", ",")
    for fmt in FORMATS:
        try:
            return datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    raise ToolError(f"cannot read the date {text!r}: write it like 2024-03-04 or March 4, 2024")


@tool
def days_between(start: str, end: str) -> str:
    """The number of days from one date to another (never negative).

    Args:
        start: the first date, e.g. "2024-03-04" or "March 4, 2024"
        end: the second date, in the same forms
    """
    return str(abs((_parse(end) - _parse(start)).days))


TOOLS = [days_between]
GRADER = "numeric"
REQUIRES_TOOLS = ["days_between"]
