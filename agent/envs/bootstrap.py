"""Bootstrapping from reference answers alone: what a task file without demos or hints needs.

A user's environment often holds nothing but tasks with answers (and, for retrieval, a
corpus). The base model calls no tool zero-shot, so collection finds nothing to train on.
Two helpers per episode, both honest about where the answer came from:

- answer-conditioned rationalisation (STaR): the failed task again, with its reference shown
  (`answer_prompt`). The trace records `hinted` and `conditioned: "answer"`, so training rows
  get the plain prompt back (traces.read.training_conversation). A trace is kept only if it
  reached the answer through the tools (`through_tools`); else its grade carries the flag
  `answer_not_from_tools` and datasets built with `exclude_flagged` drop it.
- self-written demonstrations (`synthesise_demos`): for a `search` tool, the real tool is
  called with a task's own prompt as the query; when a returned passage holds the reference,
  the trajectory (call -> the real result -> the answer) becomes a demonstration. Nothing in
  it is invented but the final sentence, which quotes the reference that the result holds.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tools.base import Tool
from traces.flags import reference_in
from traces.read import find_numbers, normalize_text, tool_calls
from traces.schemas import PlanStep, Task, Trace

NOT_FROM_TOOLS = "answer_not_from_tools"  # the flag a rationalised trace gets when it fails


def answer_text(answer: Any) -> str:
    """The reference as a person would say it: a list joined with "and"."""
    if isinstance(answer, list):
        return " and ".join(str(a) for a in answer)
    return str(answer)


def answer_prompt(task: Task) -> str:
    """The task's prompt with its reference answer shown (collection only, never eval). The
    answer comes last: the base model tends to echo the last sentence it was given, and an echo
    of "The answer is X." is a clean answer, where "...then answer." trailed the instruction
    into the training row (seen in 7 of 11 answer-shown episodes with the earlier wording)."""
    return (
        f"{task.prompt}\n\nUse the tools to find and confirm it. "
        f"The answer is {answer_text(task.answer)}."
    )


def _in_arguments(reference: Any, arguments: dict[str, Any]) -> bool:
    """Whether the reference was written into a tool call's arguments (copied, not found)."""
    text = " ".join(str(v) for v in arguments.values())
    refs = reference if isinstance(reference, list) else [reference]
    for r in refs:
        if isinstance(r, int | float) and not isinstance(r, bool):
            if any(abs(v - float(r)) <= 1e-9 * max(1.0, abs(r)) for v, _, _ in find_numbers(text)):
                return True
        elif str(r).strip() and normalize_text(str(r)) in normalize_text(text):
            return True
    return False


def through_tools(task: Task, trace: Trace, tool_names: Sequence[str] | None = None) -> str | None:
    """Why a right answer to an answer-conditioned episode did NOT come through the tools, or
    None when it did: at least one call of the task's tools succeeded, no call's arguments hold
    the reference (the model copied it into the query), and the reference appears in what a
    tool returned (passages for `search`, the result text for other tools)."""
    if task.answer is None:
        return "the task has no reference answer"
    allowed = set(tool_names or task.tools or [])
    calls = [c for c in tool_calls(trace) if not allowed or c.name in allowed]
    ok = [c for c in calls if not c.error and c.result]
    if not ok:
        return "no successful call of the task's tools"
    if any(_in_arguments(task.answer, c.arguments) for c in calls):
        return "the reference was copied into a tool call's arguments"
    texts = [s.retrieval.texts for s in trace.spans if s.retrieval is not None]
    results = [t for group in texts for t in group] + [c.result or "" for c in ok]
    if not reference_in(task.answer, results):
        return "the reference is in no tool result"
    return None


def _search_query(prompt: str) -> str:
    """A task prompt as a search query: the question itself, without a trailing "?"."""
    return re.sub(r"\s+", " ", prompt).strip().rstrip("?").strip()


async def synthesise_demos(
    tasks: Sequence[Task], tools: Sequence[Tool], k: int, *, max_tries: int = 40
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Up to `k` demonstrations written by really calling the tools on `tasks` (train tasks,
    in order): for `search`, the task's prompt as the query; kept when a passage returned
    holds the reference answer. Returns (demos, counts: tried, kept, no_reference).

    Other tools get no synthetic demonstration: a schema-shaped call with made-up arguments
    would show the model a call that answers nothing; their tasks rely on rationalisation."""
    by_name = {t.name: t for t in tools}
    demos: list[dict[str, Any]] = []
    counts = {"tried": 0, "kept": 0, "no_reference": 0}
    for task in tasks:
        if len(demos) >= k or counts["tried"] >= max_tries:
            break
        names = task.tools or list(by_name)
        if "search" not in names or "search" not in by_name or task.answer is None:
            continue
        counts["tried"] += 1
        query = _search_query(task.prompt)
        tool = by_name["search"]
        passages = await tool.asearch(query) if hasattr(tool, "asearch") else None
        result = await tool.ainvoke({"query": query})
        texts = [p.text for p in passages] if passages is not None else [result]
        if not reference_in(task.answer, texts):
            counts["no_reference"] += 1
            continue
        call = {
            "id": "call_1",
            "type": "function",
            "function": {"name": "search", "arguments": {"query": query}},
        }
        demos.append(
            {
                "messages": [
                    {"role": "user", "content": task.prompt},
                    {"role": "assistant", "content": "", "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "call_1", "name": "search", "content": result},
                    {"role": "assistant", "content": f"{answer_text(task.answer)}."},
                ],
                "task_id": task.id,
            }
        )
        counts["kept"] += 1
    return demos, counts


def answers_in_corpus(tasks: Sequence[Task], corpus_dir: Path | None) -> tuple[int, int]:
    """(tasks whose reference appears somewhere in the corpus files, tasks with a reference):
    when the first is 0, no search can ever reach an answer."""
    with_ref = [t for t in tasks if t.answer is not None]
    if corpus_dir is None or not corpus_dir.is_dir():
        return 0, len(with_ref)
    docs = []
    for p in sorted(corpus_dir.rglob("*")):
        if p.is_file() and p.suffix.lower() in {".md", ".txt", ".markdown", ".rst", ".html"}:
            docs.append(p.read_text(encoding="utf-8", errors="replace"))
    found = sum(reference_in(t.answer, docs) for t in with_ref)
    return found, len(with_ref)


REFERENCE_POLICY = "reference-policy"  # the model name its spans record
NOT_FOUND = "I could not find the answer in the documents."


def _reference_policy_class():
    """ReferencePolicy, built on first use (langchain_core is imported only then)."""
    from langchain_core.language_models.chat_models import BaseChatModel
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langchain_core.outputs import ChatGeneration, ChatResult

    class ReferencePolicy(BaseChatModel):
        """A scripted policy for tasks with a reference answer, played through the real tools:
        - a task with a `plan` (agent.envs.bootstrap.plan_tasks): it makes the plan's calls in
          order, going on only while each result holds that step's `expect`, and answers the
          reference once the last result holds it;
        - any other task (it needs `search`): it calls the real `search` with the question and
          answers the reference if a returned passage holds it.
        Where a step fails it says it found nothing (NOT_FOUND), so the episode is graded wrong.
        The agent runs it like any model (same tools, tracer and grader), subagents included: a
        subagent's conversation starts with the plan step's `task`, which is a task of its own
        here. Its right episodes are ordinary grounded traces: every fact came from a tool.

        The task is known from the conversation's first user message (`tasks`: prompt -> Task);
        a conversation whose prompt is unknown gets NOT_FOUND."""

        tasks: dict[str, Any]

        @property
        def _llm_type(self) -> str:
            return REFERENCE_POLICY

        def bind_tools(self, tools: Any, **kwargs: Any) -> ReferencePolicy:
            return self  # it calls tools by name, which the agent resolves

        def _reply(self, messages: list[Any]) -> AIMessage:
            meta = {"model_name": REFERENCE_POLICY, "adapter": "reference"}
            users = [m for m in messages if isinstance(m, HumanMessage)]
            task = self.tasks.get(str(users[-1].content)) if users else None
            results = [str(m.content) for m in messages if isinstance(m, ToolMessage)]
            if task is None or task.answer is None:
                return AIMessage(NOT_FOUND, response_metadata=meta)
            plan = task.plan or [PlanStep(tool="search",
                                          arguments={"query": _search_query(task.prompt)})]  # fmt: skip
            done = len(results)
            if done and done <= len(plan):
                expect = plan[done - 1].expect
                if expect is not None and not reference_in(expect, results[-1:]):
                    return AIMessage(NOT_FOUND, response_metadata=meta)
            if done < len(plan):
                step = plan[done]
                call = {"id": f"call_{done + 1}", "name": step.tool, "args": dict(step.arguments)}
                return AIMessage("", tool_calls=[call], response_metadata=meta)
            if reference_in(task.answer, results[-1:] if task.plan else results):
                return AIMessage(f"{answer_text(task.answer)}.", response_metadata=meta)
            return AIMessage(NOT_FOUND, response_metadata=meta)

        def _generate(self, messages: list[Any], stop: Any = None, run_manager: Any = None,
                      **kwargs: Any) -> ChatResult:  # fmt: skip
            return ChatResult(generations=[ChatGeneration(message=self._reply(messages))])

    return ReferencePolicy


def plan_tasks(tasks: Sequence[Task]) -> list[Task]:
    """`tasks` and, for each plan step that hands a question to a subagent (a `task` argument
    and an `expect`), that question as a task of its own whose reference is the `expect`: the
    subagent's conversation starts with it, so the reference policy plays the subagent too."""
    out = list(tasks)
    for t in tasks:
        for step in t.plan or ():
            question = step.arguments.get("task")
            if isinstance(question, str) and step.expect is not None:
                out.append(Task(id=f"{t.id}:{step.tool}", prompt=question, answer=step.expect))
    return out


def reference_policy(tasks: Sequence[Task]) -> Any:
    """The reference policy (a LangChain chat model) for `tasks` and their subagent steps."""
    return _reference_policy_class()(tasks={t.prompt: t for t in plan_tasks(tasks)})


def reference_playable(task: Task, tool_names: Sequence[str]) -> bool:
    """Whether the reference policy can play `task`: it has a reference and a plan, or
    `search` among its tools."""
    if task.answer is None:
        return False
    return bool(task.plan) or "search" in (task.tools or tool_names)
