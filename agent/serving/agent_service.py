"""The orchestrator agent behind the chat-completions protocol, as the model `selftune-agent`.

A request runs one episode of `Agent` (its tools, retrieval, subagents and active adapter);
the answer is the assistant message and the episode's trace id is the completion's id.

Conversations: Chat Completions is stateless, so by default the request's earlier messages
are the episode's history and its last message (the user's) is the task. With a conversation
id (the `X-Selftune-Conversation` header or `metadata.conversation_id`) the agent keeps the
conversation in its checkpoint thread of that id (the one `selftune run --thread ID` uses):
only the last user message is new, earlier messages in the request are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.agent import Agent, RunResult
from agent.model.openai import ModelServerDown
from tools.errors import SelftuneError
from traces.schemas import new_id

AGENT_MODEL = "selftune-agent"


class AgentRequestError(SelftuneError, ValueError):
    """A request the agent cannot take; the message names the field and the fix."""


@dataclass
class AgentTurn:
    """What one request asks the agent to do."""

    task: str
    history: list[dict[str, Any]] = field(default_factory=list)
    system_extra: str = ""
    conversation: str | None = None


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def agent_turn(body: dict[str, Any], conversation: str | None) -> AgentTurn:
    """Split a request's messages into the task, the history and the client's system text."""
    if body.get("tools"):
        raise AgentRequestError(
            f"'tools': {AGENT_MODEL} runs its own tools (see `selftune tools list`); "
            "send client-side tools to the raw model's name instead"
        )
    messages = body["messages"]
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "user":
        raise AgentRequestError(
            f"'messages': the last message must be the user's turn for {AGENT_MODEL}"
        )
    system = [_text(m.get("content")) for m in messages if m.get("role") in ("system", "developer")]
    history = [
        {**m, "content": _text(m.get("content"))}
        for m in messages[:-1]
        if m.get("role") not in ("system", "developer")
    ]
    return AgentTurn(
        task=_text(last.get("content")),
        history=[] if conversation else history,
        system_extra="\n\n".join(s for s in system if s),
        conversation=conversation,
    )


class AgentService:
    """One `Agent` for the server's life, started on the first request."""

    def __init__(self, agent: Agent):
        self.agent = agent

    async def run(
        self,
        turn: AgentTurn,
        *,
        trace_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        sampling: dict[str, Any] | None = None,
    ) -> RunResult:
        """Run the episode; never raises for what happens inside it (see `Agent.run`)."""
        cfg = self.agent.cfg
        system = cfg.agent.system_prompt
        if turn.system_extra:
            system = f"{system}\n\n{turn.system_extra}"
        trace_id = trace_id or new_id()
        # `metadata.route` of the request: the route whose adapter answers ([model] adapter =
        # "routed"); other adapters ignore it
        route = ((metadata or {}).get("request_metadata") or {}).get("route")
        try:
            return await self.agent.run(
                turn.task,
                history=turn.history,
                thread_id=turn.conversation,
                trace_id=trace_id,
                system_prompt=system,
                tags=["traffic"],
                metadata=metadata,
                route=route if isinstance(route, str) else None,
                **(sampling or {}),
            )
        except ModelServerDown as e:
            # Agent.run raises this one so that an eval stops; a server answers the request
            # with the error (the trace already records it) and stays up for the next one
            return RunResult(answer=None, status="error", trace_id=trace_id, error=str(e))

    async def aclose(self) -> None:
        await self.agent.aclose()


def finish_reason(result: RunResult) -> str:
    """OpenAI's finish_reason for an episode's status: a step limit is `length`."""
    return "stop" if result.status == "ok" else "length"
