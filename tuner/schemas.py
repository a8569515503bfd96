"""The tuner's data contracts: training settings, adapter records, eval summaries, gate results.

These are the only tuner objects that cross a package boundary. `EvalSummary` is the contract
between the evaluation runner (agent/envs/run.py, which plays episodes) and the eval gate (which decides).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agent.serving.vllm import LORA_RANKS

TrainKind = Literal["sft", "dpo", "kto"]
AdapterStatus = Literal["candidate", "active", "rejected", "retired"]

# Every linear projection of a Llama-style block (SmolLM2, Llama, Qwen, Mistral...).
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Keys of the `[tuner]` config section that belong to the gate or the improve job, not training.
_NON_TRAINING_KEYS = {"gate_margin", "guard_margin", "min_new_traces", "grpo_rollout_engine"}


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainConfig(_Schema):
    """How one adapter is trained. Built from the `[tuner]` config section plus these extras."""

    lora_r: int = Field(default=16, ge=1, le=512)
    lora_alpha: int = Field(default=32, ge=1)
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: list(ALL_LINEAR))
    # the largest rank the serving side accepts (vLLM --max-lora-rank); lora_r must fit it
    max_lora_rank: int = Field(default=64, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)
    epochs: float = Field(default=2.0, gt=0)
    max_steps: int = Field(default=-1, ge=-1)
    batch_size: int = Field(default=8, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    max_length: int = Field(default=1024, ge=16)
    seed: int = 0
    save_steps: int = Field(default=25, ge=1)
    save_total_limit: int = Field(default=2, ge=1)
    logging_steps: int = Field(default=1, ge=1)
    # None = decide from the hardware / model: bf16 where the CPU or GPU supports it,
    # gradient checkpointing only for models of 1B parameters or more (it cost 1.6x on 135M).
    bf16: bool | None = None
    gradient_checkpointing: bool | None = None
    padding_free: bool = False
    beta: float = Field(default=0.1, gt=0)  # DPO / KTO temperature
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _rank_fits_serving(self) -> TrainConfig:
        if self.lora_r > self.max_lora_rank:
            raise ValueError(
                f"lora_r={self.lora_r} is above max_lora_rank={self.max_lora_rank}: vLLM could not "
                "serve the adapter. Lower [tuner] lora_r, or raise max_lora_rank and start vLLM "
                f"with --max-lora-rank {self.lora_r} or more"
            )
        if self.max_lora_rank not in LORA_RANKS:
            raise ValueError(
                f"max_lora_rank={self.max_lora_rank} is not a value vLLM accepts: use one of "
                f"{', '.join(map(str, LORA_RANKS))}"
            )
        return self

    @classmethod
    def from_section(cls, section: Any = None, **overrides: Any) -> TrainConfig:
        """Build from a `[tuner]` section (a TunerConfig or its dict); gate keys are dropped."""
        if section is None:
            data: dict[str, Any] = {}
        elif isinstance(section, BaseModel):
            data = section.model_dump()
        else:
            data = dict(section)
        data = {k: v for k, v in data.items() if k not in _NON_TRAINING_KEYS}
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(data)


class GrpoConfig(_Schema):
    """One online GRPO run: rollouts by the agent, group-relative advantages, LoRA updates."""

    steps: int = Field(default=8, ge=1)
    group_size: int = Field(default=4, ge=2)  # episodes per task per step
    tasks_per_step: int = Field(default=4, ge=1)
    temperature: float = Field(default=1.0, gt=0.0)
    max_tokens: int = Field(default=64, ge=1)  # per model turn
    learning_rate: float = Field(default=5e-5, gt=0)
    # KL penalty to the adapter the run started from (k3 estimator, per token); 0 skips the
    # reference forward pass, which costs a third of an update on CPU
    beta: float = Field(default=0.0, ge=0.0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    micro_batch: int = Field(default=8, ge=1)  # sequences per forward/backward
    concurrency: int = Field(default=16, ge=1)  # episodes at once in a rollout
    judge: bool = False  # also rank each group with the LLM judge (RULER-style), mixed 50/50
    # where the rollouts run: "agent" = the agent's own backend (in process, or the [model]
    # server with the policy hot-loaded as a LoRA each step); "vllm" = a vLLM server the run
    # starts for itself, serving the policy's merged weights, reloaded in place each step
    rollout_engine: Literal["agent", "vllm"] = "agent"
    seed: int = 0


class TrainResult(_Schema):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    adapter_dir: Path
    metrics: dict[str, Any]
    config: TrainConfig


class EvalSummary(_Schema):
    """One evaluation of one model (base or adapter) on one environment's split."""

    env: str
    split: str = "heldout"
    n: int = Field(ge=0)
    successes: int = Field(ge=0)
    success_rate: float = Field(ge=0.0, le=1.0)
    ci95: tuple[float, float] = (0.0, 1.0)
    flag_rate: float = Field(default=0.0, ge=0.0, le=1.0)  # e.g. reward-hacking flags
    per_task: dict[str, float] = Field(default_factory=dict)
    seed: int = 0
    sampling: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> EvalSummary:
        if self.successes > self.n:
            raise ValueError(f"successes={self.successes} is more than n={self.n}")
        if self.n and abs(self.successes / self.n - self.success_rate) > 1e-6:
            raise ValueError(
                f"success_rate={self.success_rate} does not match successes/n="
                f"{self.successes}/{self.n}"
            )
        return self


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
