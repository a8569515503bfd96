"""The trace data contract: what one episode looks like on disk and across package boundaries.

A Trace is one episode. Its steps are Spans in a tree (parent_id), one kind each: agent, llm,
tool, retrieval, subagent. Kind-specific payloads sit in `llm`, `tool` and `retrieval`. Grades
(verifier, judge or human) are separate records pointing at a trace. A grader's verdict before
it is stored is a GradeResult (custom graders and environments may return one).

Times are Unix epoch seconds (float). Bump SCHEMA_VERSION when a stored shape changes and
teach `traces.store` to migrate the old rows forward.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tools.errors import SelftuneError

SCHEMA_VERSION = 1

SpanKind = Literal["agent", "llm", "tool", "retrieval", "subagent"]
SpanStatus = Literal["running", "ok", "error"]
# "failed": the process died or an exception ended the episode; "max_steps" and "timeout"
# are limits the agent hit; "ok" means it produced a final answer.
TraceStatus = Literal["running", "ok", "error", "failed", "max_steps", "timeout"]
GradeSource = Literal["verifier", "judge", "human"]


def new_id() -> str:
    return uuid.uuid4().hex


def now() -> float:
    return time.time()


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ToolCall(_Schema):
    """One tool call as the model wrote it, and as we parsed it."""

    id: str
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    raw_arguments: str = ""  # exactly the text the model produced for the arguments
    error: str | None = None  # set when the call could not be parsed


class LlmData(_Schema):
    messages: list[dict[str, Any]]  # exactly what was sent (OpenAI-style message dicts)
    tools: list[dict[str, Any]] = Field(default_factory=list)  # the tool schemas sent
    completion: str = ""  # raw completion text
    tool_calls: list[ToolCall] = Field(default_factory=list)
    model: str | None = None
    adapter: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    prompt_token_ids: list[int] | None = None
    completion_token_ids: list[int] | None = None
    sampling: dict[str, Any] = Field(default_factory=dict)
    finish_reason: str | None = None  # "stop", "length", "tool_calls"


class ToolData(_Schema):
    name: str
    call_id: str | None = None
    arguments: dict[str, Any] = Field(default_factory=dict)
    result: str | None = None
    error: str | None = None
    server: str | None = None  # MCP server name, for MCP tools


class RetrievalData(_Schema):
    query: str
    collection: str
    ids: list[str] = Field(default_factory=list)
    scores: list[float] = Field(default_factory=list)
    texts: list[str] = Field(default_factory=list)
    sources: list[str] = Field(default_factory=list)


class Span(_Schema):
    id: str = Field(default_factory=new_id)
    trace_id: str
    parent_id: str | None = None
    kind: SpanKind
    name: str
    start: float = Field(default_factory=now)
    end: float | None = None
    status: SpanStatus = "running"
    error: str | None = None
    attributes: dict[str, Any] = Field(default_factory=dict)
    llm: LlmData | None = None
    tool: ToolData | None = None
    retrieval: RetrievalData | None = None

    @property
    def latency_s(self) -> float | None:
        return None if self.end is None else self.end - self.start


class Trace(_Schema):
    id: str = Field(default_factory=new_id)
    env: str | None = None
    task_id: str | None = None
    model: str | None = None
    adapter: str | None = None  # adapter version that answered ("v3"), None = base model
    start: float = Field(default_factory=now)
    end: float | None = None
    status: TraceStatus = "running"
    answer: str | None = None
    error: str | None = None
    tags: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    spans: list[Span] = Field(default_factory=list)  # filled when read with spans

    @property
    def latency_s(self) -> float | None:
        return None if self.end is None else self.end - self.start


class Grade(_Schema):
    """A grade or a piece of feedback on one trace.

    One grade per (trace_id, grader): re-grading replaces the earlier grade.
    """

    id: str = Field(default_factory=new_id)
    trace_id: str
    value: float  # in [0, 1]; human thumbs are 1.0 (up) and 0.0 (down)
    source: GradeSource
    grader: str  # who or what gave it: "numeric", "judge:smollm2", "human:alice"
    reason: str = ""
    flags: list[str] = Field(default_factory=list)  # reward-hacking flags
    raw: str | None = None  # the judge's raw output
    metadata: dict[str, Any] = Field(default_factory=dict)
    created: float = Field(default_factory=now)


class GraderError(SelftuneError, ValueError):
    """A grader name or a task's reference answer is unusable; the message says how to fix it."""


@dataclass
class GradeResult:
    """What a grader returns (a custom `module:function` grader or an environment's `grade` may
    return one too). `error` is set when grading itself failed (judge junk, a bad regex, a
    crashing custom grader): then `score` is 0.0 and means nothing."""

    score: float
    reason: str
    flags: list[str] = field(default_factory=list)
    raw: str | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        if not (0.0 <= self.score <= 1.0) or math.isnan(self.score):
            raise GraderError(f"grade score {self.score!r} is outside [0, 1]")

    @classmethod
    def failed(cls, message: str, raw: str | None = None) -> GradeResult:
        """Grading failed: score 0.0, `message` as the reason and the error."""
        return cls(0.0, message, raw=raw, error=message)


class TracesConfig(BaseModel):
    """The `[traces]` section of selftune.toml."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    db: str | None = None  # default <workspace>/traces.db
    otlp_endpoint: str | None = None  # falls back to OTEL_EXPORTER_OTLP_ENDPOINT
    otlp_headers: dict[str, str] = Field(default_factory=dict)
    capture_content: bool = True  # message content in OTel export (opt-in attributes)
    scrub_patterns: list[str] = Field(default_factory=list)  # extra regexes to redact

    @field_validator("scrub_patterns")
    @classmethod
    def _patterns_compile(cls, v: list[str]) -> list[str]:
        import re

        for p in v:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"{p!r} is not a valid regular expression: {e}") from e
        return v


class PlanStep(_Schema):
    """One tool call of a task's plan: the call the task needs, with what its result must hold
    (`expect`: the looked-up fact; a number as an equal number, a string as a substring)."""

    tool: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    expect: Any = None


class Task(_Schema):
    """One task of an environment (one line of a tasks.jsonl). Only `prompt` is required."""

    id: str = ""  # defaults to a hash of the prompt (filled by the loader)
    prompt: str
    answer: Any = None
    grader: str | None = None  # exact|numeric|contains|regex|judge|<module:function>
    split: Literal["train", "test"] = "train"
    tools: list[str] | None = None  # None = the environment's tools
    # a hint for collection only (`collect --hints`, improve's last wave): appended to the prompt
    # of tasks the model failed without it, and removed again from training rows (STaR's
    # "rationalization"); never shown in eval
    hint: str | None = None
    # the tool calls that reach the answer, in order (collection only, never shown to the
    # model): the reference wave plays them through the real tools, and a subagent step's
    # `expect` is that subagent's reference (agent.envs.bootstrap.ReferencePolicy)
    plan: list[PlanStep] | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class TraceQuery(_Schema):
    """A filter over stored traces (every field optional); results come newest first."""

    env: str | None = None
    task_id: str | None = None
    adapter: str | None = None  # "base" matches traces run on the base model (adapter None)
    status: TraceStatus | None = None
    tag: str | None = None
    since: float | None = None  # start >= since (epoch seconds)
    until: float | None = None  # start < until
    min_grade: float | None = None  # some grade (by `grader`, if given) >= min_grade
    max_grade: float | None = None  # some grade (by `grader`, if given) <= max_grade
    grader: str | None = None
    limit: int | None = Field(default=50, ge=1)  # None = all
    offset: int = Field(default=0, ge=0)


class TraceStats(_Schema):
    """Counts for one (environment, adapter) pair, as `TraceStore.stats()` returns them."""

    env: str | None
    adapter: str | None
    total: int
    ok: int
    failed: int  # status failed, error, max_steps or timeout
    running: int
    graded: int  # traces with at least one grade
    mean_grade: float | None

    @property
    def success_rate(self) -> float | None:
        """ok / finished traces; None when none has finished."""
        done = self.ok + self.failed
        return None if done == 0 else self.ok / done
