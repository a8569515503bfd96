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


class Verdict(_Schema):
    """One training sanity check (tuner/sanity.py): what was measured against which limit."""

    name: str  # loss_mask, duplicates, task_share, loss_down, probe_changed, grpo_skipped, grpo_kl
    ok: bool
    value: float | None = None  # None: not measurable here (the message says why)
    threshold: float | None = None
    message: str


class TrainResult(_Schema):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    adapter_dir: Path
    metrics: dict[str, Any]
    config: TrainConfig
    verdicts: list[Verdict] = Field(default_factory=list)


class Guard(NamedTuple):
    """A metric the candidate must not make worse by more than `margin`."""

    candidate: float
    active: float
    margin: float
    higher_is_better: bool = True
    # which guard this is, named when it blocks a promotion: "env" (one of the job's
    # environments), "probe" (the general-ability probe), "promoted" (an environment an earlier
    # promotion was gated on), "flags", "grounded", "robustness"
    kind: str = "guard"


class GateResult(_Schema):
    promote: bool
    reasons: list[str]
    # metric -> {"active", "candidate", "delta", "margin", "higher_is_better", "ok", "guard"}
    numbers: dict[str, dict[str, Any]]
    candidate: str | None = None
    active: str | None = None  # None: the base model
    decided_at: float = Field(default_factory=time.time)
    # task kind -> {"won": n, "lost": n, "tasks": n}: where the candidate gained and lost
    by_kind: dict[str, dict[str, int]] = Field(default_factory=dict)
    # the guards that regressed past their margin, as "kind: metric" ("probe:
    # success_rate[general]"); empty when none did (a rejection is then the target's)
    blocked_by: list[str] = Field(default_factory=list)
    # environments judged only as guards, never part of the target: name -> guard kind
    guard_envs: dict[str, str] = Field(default_factory=dict)
    # the route the candidate was gated for (None: the global pointer); a pass promotes it
    # on that route only
    route: str | None = None


class AdapterRecord(_Schema):
    """Everything known about one adapter version; stored as `<registry>/vN/record.json`."""

    version: str
    status: AdapterStatus = "candidate"
    base_model: str
    parent: str | None = None
    dataset_manifest: str | None = None  # path of the dataset's manifest.json
    dataset_hash: str | None = None  # sha256 of that manifest
    # sha256 of adapter_config.json and adapter_model.safetensors at registration; promote and
    # every load verify them ({} in records from before checksums)
    sha256: dict[str, str] = Field(default_factory=dict)
    train_config: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    eval_results: list[dict[str, Any]] = Field(default_factory=list)
    created_at: float = Field(default_factory=time.time)
    notes: list[str] = Field(default_factory=list)
    # the sanity verdicts of its training (empty in records written before they existed)
    verdicts: list[Verdict] = Field(default_factory=list)
    # where the PEFT folder is; filled in by the registry when it reads the record
    path: str | None = Field(default=None, exclude=True)

    @field_validator("version")
    @classmethod
    def _version_shape(cls, v: str) -> str:
        if not (v.startswith("v") and v[1:].isdigit()):
            raise ValueError(f"version {v!r} is not of the form v1, v2, ...")
        return v
