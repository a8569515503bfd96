"""`ChatLocal`: the LangChain chat model over a `LocalEngine`, and the AIMessage it answers with
(tool calls parsed, token ids and sampling in `response_metadata`, the keys every backend fills).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.messages.tool import invalid_tool_call, tool_call
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field

from agent.messages import to_message_dicts
from agent.model.engine import Completion, Sampling
from agent.model.parsing import parse_tool_calls


def to_openai_tool(tool: Any) -> dict[str, Any]:
    """An OpenAI tool schema from a LangChain tool, an OpenAI-format dict, or an object whose
    `.schema()` returns OpenAI function format."""
    from langchain_core.tools import BaseTool
    from pydantic import BaseModel

    if isinstance(tool, dict):
        if tool.get("type") == "function" and "function" in tool:
            return tool
        if "name" in tool and "parameters" in tool:
            return {"type": "function", "function": tool}
        return convert_to_openai_tool(tool)
    if (
        not isinstance(tool, BaseTool | type | BaseModel)
        and callable(getattr(tool, "schema", None))
        and not callable(tool)
    ):
        return to_openai_tool(tool.schema())
    return convert_to_openai_tool(tool)


def completion_to_message(c: Completion) -> AIMessage:
    """An AIMessage with parsed tool calls, usage and the response_metadata traces copy."""
    parsed = parse_tool_calls(c.text)
    finish = "tool_calls" if parsed.calls and c.finish_reason == "stop" else c.finish_reason
    return AIMessage(
        content=parsed.content,
        tool_calls=[tool_call(name=p.name, args=p.arguments, id=p.id) for p in parsed.calls],
        invalid_tool_calls=[
            invalid_tool_call(name=None, args=None, id=None, error=e) for e in parsed.errors
        ],
        usage_metadata={
            "input_tokens": c.prompt_tokens,
            "output_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens,
        },
        response_metadata=response_metadata(
            model_name=c.model_name,
            adapter=c.adapter,
            finish_reason=finish,
            raw_completion=c.text,
            prompt_token_ids=c.prompt_token_ids,
            completion_token_ids=c.completion_token_ids,
            sampling=c.sampling,
        ),
    )


def response_metadata(
    *,
    model_name: str,
    adapter: str | None,
    finish_reason: str | None,
    raw_completion: str,
    prompt_token_ids: list[int] | None,
    completion_token_ids: list[int] | None,
    sampling: dict[str, Any],
) -> dict[str, Any]:
    """The exact response_metadata keys every backend fills (the agent copies them to traces)."""
    return {
        "model_name": model_name,
        "adapter": adapter,
        "finish_reason": finish_reason,
        "raw_completion": raw_completion,
        "prompt_token_ids": prompt_token_ids,
        "completion_token_ids": completion_token_ids,
        "sampling": sampling,
    }


class ChatLocal(BaseChatModel):
    """A LangChain chat model over a `LocalEngine`; concurrent calls share `generate` batches."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    engine: Any = Field(exclude=True)
    adapter: str | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None
    stop: list[str] | None = None

    @property
    def _llm_type(self) -> str:
        return "selftune-local"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.engine.name,
            "adapter": self.adapter,
            **self._sampling().as_dict(),
        }

    def bind_tools(
        self, tools: Sequence[Any], *, tool_choice: Any = None, **kwargs: Any
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools; they go into the system turn. `tool_choice` is accepted and ignored: a
        local model cannot be forced, it is asked."""
        return self.bind(tools=[to_openai_tool(t) for t in tools], **kwargs)

    def _sampling(self, stop: list[str] | None = None) -> Sampling:
        return Sampling(
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=self.max_tokens,
            seed=self.seed,
            stop=tuple(stop if stop is not None else self.stop or ()),
        )

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        c = self.engine.generate(
            to_message_dicts(list(messages)),
            kwargs.get("tools"),
            adapter=self.adapter,
            sampling=self._sampling(stop),
        )
        return ChatResult(generations=[ChatGeneration(message=completion_to_message(c))])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        c = await self.engine.agenerate(
            to_message_dicts(list(messages)),
            kwargs.get("tools"),
            adapter=self.adapter,
            sampling=self._sampling(stop),
        )
        return ChatResult(generations=[ChatGeneration(message=completion_to_message(c))])
