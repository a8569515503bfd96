"""Helpers for the grader, flag and environment tests: traces built from parts, and chat models.

`ChatHF` is a minimal LangChain chat model over a transformers model (greedy), used where the
lead's local backend (agent.model) is not importable. `ScriptedChat` replays fixed replies
(junk included) for the judge's failure paths.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import ConfigDict

from traces.schemas import LlmData, Span, Task, ToolData, Trace

_clock = itertools.count(1)


def make_trace(
    answer: str | None,
    calls: list[tuple[str, dict, str | None]] = (),
    *,
    finish_reason: str = "stop",
    subagents: list[str] = (),
    env: str | None = "test-env",
) -> Trace:
    """A finished trace whose tool spans are `calls` (name, arguments, result) and whose last LLM
    span stopped with `finish_reason`. A result of None records a tool error."""
    trace = Trace(env=env, task_id="t", status="ok", answer=answer)
    for name, args, result in calls:
        data = ToolData(name=name, arguments=args, result=result, error=None)
        if result is None:
            data.error = "tool failed"
        kind = "subagent" if name in subagents else "tool"
        t = float(next(_clock))
        trace.spans.append(
            Span(
                trace_id=trace.id,
                kind=kind,
                name=name,
                start=t,
                end=t + 0.5,
                status="ok",
                tool=data,
            )
        )
    t = float(next(_clock))
    trace.spans.append(
        Span(
            trace_id=trace.id,
            kind="llm",
            name="chat",
            start=t,
            end=t + 1,
            status="ok",
            llm=LlmData(messages=[], completion=answer or "", finish_reason=finish_reason),
        )
    )
    return trace


def task(prompt: str = "What is 1234 * 5678?", answer: Any = 7006652, **kw) -> Task:
    return Task(id=kw.pop("id", "t"), prompt=prompt, answer=answer, **kw)


class ScriptedChat(BaseChatModel):
    """Replies with the given texts in turn (the last one repeats); records the prompts."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    replies: list[str]
    seen: list[list[BaseMessage]] = []
    fail: bool = False

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def _generate(self, messages, stop=None, run_manager=None, **kwargs) -> ChatResult:
        if self.fail:
            raise ConnectionError("judge server unreachable")
        self.seen.append(list(messages))
        text = self.replies[min(len(self.seen) - 1, len(self.replies) - 1)]
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=text))])


class ChatHF(BaseChatModel):
    """Greedy chat over a loaded transformers model and tokenizer (the model's chat template)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    hf_model: Any
    tokenizer: Any
    max_new_tokens: int = 64

    @property
    def _llm_type(self) -> str:
        return "hf-test"

    def _generate(self, messages, stop=None, run_manager=None, **kwargs) -> ChatResult:
        import torch

        role = {"human": "user", "ai": "assistant", "system": "system"}
        turns = [{"role": role.get(m.type, m.type), "content": str(m.content)} for m in messages]
        ids = self.tokenizer.apply_chat_template(
            turns, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            out = self.hf_model.generate(**ids, max_new_tokens=self.max_new_tokens, do_sample=False)
        text = self.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=text))])


def local_chat_model(model_path: Path, max_new_tokens: int = 64) -> BaseChatModel:
    """The real SmolLM2 (conftest's `model_path`) as a LangChain chat model, greedy.
    agent.model has no LangChain chat model yet, so this wraps transformers directly."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return ChatHF(hf_model=model, tokenizer=tok, max_new_tokens=max_new_tokens)
