"""Schemas that cross the tools/ boundary."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class McpServerConfig(_Section):
    name: str
    transport: Literal["stdio", "http"] = "stdio"
    command: str | None = None
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    url: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    allow: list[str] | None = None  # tool allowlist; None = every tool the server offers
    # below the agent's [agent] tool_timeout_s (30 s): the server's own timeout must fire first,
    # or the agent gives up on the call and the hung server is never restarted
    timeout_s: float = Field(default=20.0, gt=0)
    # a required server that fails to start stops the agent; any other is skipped with a
    # warning, and calls to its tools return an error that names it
    required: bool = False

    @field_validator("name")
    @classmethod
    def _name_is_identifier(cls, v: str) -> str:
        if not v.replace("-", "_").isidentifier():
            raise ValueError("must be letters, digits, '_' or '-' (it prefixes tool names)")
        return v
