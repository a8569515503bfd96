"""A scripted chat model: what it says is fixed, so each path of the orchestrator (and each of
the judge's failure paths) is hit on purpose. The real model runs the same graph in
test_agent_real.py, and judges in test_graders.py."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage
from langchain_core.outputs import ChatGeneration, ChatResult


class Scripted(BaseChatModel):
    """Answers with the next item of a script (an AIMessage, a text, or a callable making one),
    then with `rest` ("done") once the script runs out; records the prompts it was sent. With
    `fail`, every call raises ConnectionError, as an unreachable server would."""

    script: list[Any] = []
    rest: Any = "done"
    seen: list[Any] = []
    delay_s: float = 0.0
    fail: bool = False

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def bind_tools(self, tools, **kw):
        return self

    def _generate(self, messages, stop=None, run_manager=None, **kw):
        raise NotImplementedError

    async def _agenerate(self, messages, stop=None, run_manager=None, **kw):
        if self.fail:
            raise ConnectionError("scripted server unreachable")
        self.seen.append(list(messages))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        item = self.script.pop(0) if self.script else self.rest
        msg = item() if callable(item) else item
        if isinstance(msg, str):
            msg = AIMessage(msg)
        msg.response_metadata = {
            "raw_completion": str(msg.content),
            "finish_reason": "stop",
            "model_name": "scripted",
        }
        return ChatResult(generations=[ChatGeneration(message=msg)])


_ids = itertools.count()


def call(name: str, **args) -> AIMessage:
    return AIMessage("", tool_calls=[{"id": f"c{next(_ids)}", "name": name, "args": args}])


def bad_call(raw: str) -> AIMessage:
    return AIMessage(
        raw,
        invalid_tool_calls=[
            {
                "id": f"c{next(_ids)}",
                "name": None,
                "args": raw,
                "error": "could not parse tool call: missing closing brace",
            }
        ],
    )


def scripted_fixture(monkeypatch):
    """Patch the backend factory so the agent talks to a Scripted model."""
    holder: dict[str, Scripted] = {}

    def factory(cfg, *, engine=None, adapter=None, **sampling):
        return holder["model"]

    monkeypatch.setattr("agent.model.make_chat_model", factory)

    def set_script(*items, delay_s: float = 0.0) -> Scripted:
        holder["model"] = Scripted(script=list(items), seen=[], delay_s=delay_s)
        return holder["model"]

    return set_script
