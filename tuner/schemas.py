"""The tuner's data contracts: training results, adapter records, gate results.

These are the only tuner objects that cross a package boundary. The tuner's settings
(TrainConfig, GrpoConfig, GateConfig, ImproveConfig) are sections of the one config tree in
`agent.config` (agent may not import tuner); they are re-exported here for code that reads the
tuner's schemas. An evaluation is `agent.envs.run.SuiteResult`, what `run_suite` returns.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agent.config import (  # noqa: F401 - re-exported: the settings live in the config tree
    ALL_LINEAR,
    GateConfig,
    GrpoConfig,
    ImproveConfig,
    TrainConfig,
)

TrainKind = Literal["sft", "dpo", "kto", "cpt"]
AdapterStatus = Literal["candidate", "active", "rejected", "retired"]


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainResult(_Schema):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    adapter_dir: Path
    metrics: dict[str, Any]
    config: TrainConfig


class Guard(NamedTuple):
    """A metric the candidate must not make worse by more than `margin`."""

    candidate: float
    active: float
    margin: float
    higher_is_better: bool = True


class GateResult(_Schema):
    promote: bool
    reasons: list[str]
    # metric -> {"active", "candidate", "delta", "margin", "higher_is_better", "ok"}
    numbers: dict[str, dict[str, Any]]
    candidate: str | None = None
    active: str | None = None  # None: the base model
    decided_at: float = Field(default_factory=time.time)
    # task kind -> {"won": n, "lost": n, "tasks": n}: where the candidate gained and lost
    by_kind: dict[str, dict[str, int]] = Field(default_factory=dict)


class AdapterRecord(_Schema):
    """Everything known about one adapter version; stored as `<registry>/vN/record.json`."""

    version: str
    status: AdapterStatus = "candidate"
    base_model: str
    parent: str | None = None
    dataset_manifest: str | None = None  # path of the dataset's manifest.json
    dataset_hash: str | None = None  # sha256 of that manifest
    train_config: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    eval_results: list[dict[str, Any]] = Field(default_factory=list)
    created_at: float = Field(default_factory=time.time)
    notes: list[str] = Field(default_factory=list)
    # where the PEFT folder is; filled in by the registry when it reads the record
    path: str | None = Field(default=None, exclude=True)

    @field_validator("version")
    @classmethod
    def _version_shape(cls, v: str) -> str:
        if not (v.startswith("v") and v[1:].isdigit()):
            raise ValueError(f"version {v!r} is not of the form v1, v2, ...")
        return v
