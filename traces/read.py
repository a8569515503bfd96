"""How to read a trace: the answer, the tool calls, the numbers in a text, the conversations.

Graders, flags, the judge and the dataset builders all read traces through these functions,
so "what did the model answer" and "which tools did it call" have one definition.

- The answer and the calls: `final_answer`, `tool_calls`, `called_names`, `last_llm`,
  `judge_material`.
- Text: `normalize_text` (for exact comparison), `find_numbers`, `answer_number` (the number
  an answer gives), `clip` (one line for a reason or a prompt).
- Conversations: `root_agent_span`, `subagent_spans`, `conversation_of` (what one agent scope
  sent and got back), `training_conversation` (the same without few-shot demonstrations), and
  `trace_tokens`.
"""

from __future__ import annotations

import copy
import re
import unicodedata
from collections.abc import Mapping
from typing import Any

from traces.schemas import GraderError, Span, Task, ToolData, Trace

# Hermes-style tool-call blocks in a raw completion; what is left is the message's text
_TOOL_CALL_BLOCK = re.compile(r"<tool_call>.*?(?:</tool_call>|$)", re.DOTALL)


# --- the answer and the calls ----------------------------------------------------------------


def final_answer(trace: Trace) -> str:
    """The trace's final answer, else the last LLM completion, else ""."""
    if trace.answer is not None:
        return trace.answer
    llm = last_llm(trace)
    return llm.llm.completion if llm is not None and llm.llm is not None else ""


def tool_calls(trace: Trace) -> list[ToolData]:
    """Every tool call of the trace in start order: spans of kind "tool", "retrieval" (the
    search tool) and "subagent" that carry ToolData, at any depth (subagents' calls included)."""
    spans = sorted((s for s in trace.spans if s.tool is not None), key=lambda s: s.start)
    return [s.tool for s in spans]


def called_names(trace: Trace) -> set[str]:
    """Names of the tools called and the subagents invoked in the trace."""
    names = {t.name for t in tool_calls(trace)}
    names |= {s.name for s in trace.spans if s.kind == "subagent"}
    return names


def last_llm(trace: Trace) -> Span | None:
    """The last LLM span of the top-level agent (the one that wrote the final answer)."""
    llms = [s for s in trace.spans if s.kind == "llm" and s.llm is not None]
    return max(llms, key=lambda s: s.start) if llms else None


def judge_material(task: Task, trace: Trace) -> list[str]:
    """The texts from the trace that a judge prompt shows: the answer and the tool results."""
    texts = [final_answer(trace)]
    for t in tool_calls(trace):
        texts.append(t.result or "")
        texts.append(t.error or "")
    return [t for t in texts if t]


# --- text and numbers ------------------------------------------------------------------------

_ANSWER_PREFIX = re.compile(
    r"^\s*(?:so,?\s+)?(?:the\s+)?(?:final\s+)?answer\s*(?:is|:|=)\s*", re.IGNORECASE
)
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")


def normalize_text(text: str) -> str:
    """Lowercase, NFKC, drop a leading "the answer is"/"answer:", punctuation (kept inside
    numbers: "3.5", "1,200"), the articles a/an/the and extra whitespace."""
    text = unicodedata.normalize("NFKC", str(text)).strip()
    text = _ANSWER_PREFIX.sub("", text).lower()
    # keep "." and "," between digits, drop every other punctuation mark
    text = re.sub(r"(?<=\d)[.,](?=\d)", lambda m: "\0" if m.group() == "." else "\1", text)
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    text = text.replace("\0", ".").replace("\1", ",")
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


# a number: optional sign, digits with "," or (narrow) space thousands groups, or plain digits,
# optional decimals; the sign only counts when not glued to a preceding word or digit ("5-3")
_NUMBER = re.compile(
    r"(?<![\w.])(?P<sign>[-−–]\s?)?"
    r"(?P<int>\d{1,3}(?:,\d{3})+|\d{1,3}(?:[ \u00a0\u202f]\d{3})+(?!\d)|\d+)?"
    r"(?P<frac>\.\d+)?(?:[eE](?P<exp>[-+]?\d+))?"
)
_MARKERS = re.compile(
    r"(?:(?:final\s+answer|answer|result|total)\s*(?:is|was|would\s+be|will\s+be|:|=)"
    r"|####|\\boxed\{)",
    re.IGNORECASE,
)


def find_numbers(text: str) -> list[tuple[float, int, int]]:
    """Every number in `text` as (value, start, end): "1,234,567", "1 234 567", "-3.5", "$1,200",
    "15%" (15), "42." (42), "x = 42" (42), "1e6"."""
    out = []
    for m in _NUMBER.finditer(text):
        if not (m.group("int") or m.group("frac")):
            continue
        digits = re.sub(r"[ ,\u00a0\u202f]", "", m.group("int") or "0") + (m.group("frac") or "")
        if m.group("exp"):
            digits += "e" + m.group("exp")
        value = float(digits)
        if m.group("sign"):
            # a dash between two numbers ("10 - 3", "2020-2024") is an operator or a range
            before = text[: m.start()].rstrip()
            if not before or not before[-1].isdigit():
                value = -value
        out.append((value, m.start(), m.end()))
    return out


def answer_number(text: str, mode: str = "auto", unit: str | None = None) -> float | None:
    """The number an answer gives, or None.

    mode "auto" (default): with a `unit` (a regex such as "desks?"), the last number written
    right before that unit ("148 desks"); else the first number after the last answer marker
    ("answer is", "total:", "result =", "####", "\\boxed{"); else the first number after the
    last "="; else the LAST number. Last rather than first because small models restate the
    question before answering ("3 boxes of 1,234 ... so 3,702"); the markers catch the
    opposite habit ("The answer is 3702 (3 × 1234)"), and the unit catches an answer that
    lists several facts ("148 desks, 12 meeting rooms and 40 parking spaces").
    mode "last" / "first": that number regardless.
    """
    numbers = find_numbers(text)
    if not numbers:
        return None
    if unit and mode == "auto":
        unit_re = re.compile(rf"^\s*(?:{unit})\b", re.IGNORECASE)
        tagged = [n for n in numbers if unit_re.match(text[n[2] :])]
        if tagged:
            return tagged[-1][0]
    if mode == "first":
        return numbers[0][0]
    if mode == "last":
        return numbers[-1][0]
    if mode != "auto":
        raise GraderError(f"number mode {mode!r} is not one of auto, first, last, any")
    for anchor in (
        [m.end() for m in _MARKERS.finditer(text)],
        [m.end() for m in re.finditer(r"(?<![<>!=])=(?!=)", text)],
    ):
        if anchor:
            after = [n for n in numbers if n[1] >= anchor[-1]]
            if after:
                return after[0][0]
    return numbers[-1][0]


def clip(text: str, n: int = 120) -> str:
    """`text` on one line, cut to at most `n` characters with an ellipsis."""
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


# --- conversations ---------------------------------------------------------------------------


def _agent_of(span: Span, by_id: Mapping[str, Span]) -> str | None:
    """The id of the nearest "agent" span above `span` (None if there is none)."""
    seen: set[str] = set()
    parent = span.parent_id
    while parent is not None and parent not in seen:
        seen.add(parent)
        p = by_id.get(parent)
        if p is None:
            return None
        if p.kind == "agent":
            return p.id
        parent = p.parent_id
    return None


def root_agent_span(trace: Trace) -> Span | None:
    """The orchestrator's agent span: the first agent span with no agent span above it."""
    by_id = {s.id: s for s in trace.spans}
    for s in trace.spans:
        if s.kind == "agent" and _agent_of(s, by_id) is None:
            return s
    return None


def subagent_spans(trace: Trace) -> list[Span]:
    """Every subagent's agent span (attribute `subagent` set), at any depth, in start order."""
    spans = [s for s in trace.spans if s.kind == "agent" and s.attributes.get("subagent")]
    return sorted(spans, key=lambda s: s.start)


def _llm_spans(trace: Trace, agent_span_id: str | None) -> list[Span]:
    by_id = {s.id: s for s in trace.spans}
    order = {s.id: i for i, s in enumerate(trace.spans)}
    llms = [
        s
        for s in trace.spans
        if s.kind == "llm" and s.llm is not None and _agent_of(s, by_id) == agent_span_id
    ]
    return sorted(llms, key=lambda s: (s.start, order[s.id]))


def _assistant_message(span: Span) -> dict[str, Any]:
    """The assistant message an llm span produced: its text without tool-call blocks, and the
    calls that parsed (arguments as dicts)."""
    llm = span.llm
    assert llm is not None
    message: dict[str, Any] = {
        "role": "assistant",
        "content": _TOOL_CALL_BLOCK.sub("", llm.completion).strip(),
    }
    calls = [c for c in llm.tool_calls if c.error is None]
    if calls:
        message["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": copy.deepcopy(c.arguments)},
            }
            for c in calls
        ]
    return message


def conversation_of(
    trace: Trace, agent_span_id: str | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The full conversation of one agent scope and the tool schemas it was offered.

    The scope is the orchestrator (`agent_span_id=None`) or the agent span of a subagent; its
    llm spans are those whose nearest agent ancestor is that span. The conversation is the
    last such span's messages (exactly what was sent, demonstrations included) plus the
    assistant message that call produced. Returns ([], []) when the scope made no llm call.
    """
    if agent_span_id is None:
        root = root_agent_span(trace)
        agent_span_id = root.id if root is not None else None
    llms = _llm_spans(trace, agent_span_id)
    if not llms:
        return [], []
    last = llms[-1]
    assert last.llm is not None
    messages = copy.deepcopy(last.llm.messages)
    reply = _assistant_message(last)
    # the orchestrator's final text is the trace's answer, exactly as the agent parsed it
    if (
        "tool_calls" not in reply
        and agent_span_id == getattr(root_agent_span(trace), "id", None)
        and trace.answer is not None
    ):
        reply["content"] = trace.answer
    messages.append(reply)
    return messages, copy.deepcopy(last.llm.tools)


def demo_count(trace: Trace) -> int:
    """How many few-shot demonstration messages followed the system prompt."""
    n = trace.metadata.get("demo_messages") or 0
    try:
        return max(0, int(n))
    except (TypeError, ValueError):
        return 0


def drop_demos(messages: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """`messages` without the `n` demonstration messages after the system message."""
    if n <= 0:
        return list(messages)
    start = 1 if messages and messages[0].get("role") == "system" else 0
    return messages[:start] + messages[start + n :]


def training_conversation(
    trace: Trace, agent_span_id: str | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`conversation_of`, with the orchestrator's demonstrations removed, and the task's own
    prompt put back where a collection hint was added to it (context distillation of both)."""
    messages, tools = conversation_of(trace, agent_span_id)
    if agent_span_id is None:
        messages = drop_demos(messages, demo_count(trace))
        original = trace.metadata.get("task_prompt")
        if trace.metadata.get("hinted") and original:
            first_user = next((i for i, m in enumerate(messages) if m.get("role") == "user"), None)
            if first_user is not None:
                messages[first_user] = {**messages[first_user], "content": original}
    return messages, tools


def trace_tokens(trace: Trace) -> int:
    """Tokens the model wrote in the trace (all scopes); counts words where none were recorded."""
    total = 0
    for s in trace.spans:
        if s.kind != "llm" or s.llm is None:
            continue
        if s.llm.output_tokens is not None:
            total += s.llm.output_tokens
        elif s.llm.completion_token_ids is not None:
            total += len(s.llm.completion_token_ids)
        else:
            total += len(s.llm.completion.split())
    return total
