"""selftune configuration: `selftune.toml` (or `--config FILE`) plus `SELFTUNE_*` overrides.

Every section is a small pydantic model that forbids unknown keys, so a typo is an error that
lists what is allowed instead of a setting that silently does nothing.

Environment overrides use double underscores between section and key:
`SELFTUNE_MODEL__BACKEND=openai`, `SELFTUNE_TRACES__OTLP_ENDPOINT=http://...`.
`SELFTUNE_HOME` sets the workspace folder.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from retrieval.schemas import RetrievalConfig
from tools.errors import SelftuneError
from tools.schemas import McpServerConfig
from traces.schemas import TracesConfig

DEFAULT_MODEL = "smollm2-135m-instruct"
CONFIG_FILENAME = "selftune.toml"


class ConfigError(SelftuneError, ValueError):
    """A configuration problem, phrased for the person who has to fix it."""


# Which LLM judge grades ([improve] judge, [tuner.grpo] judge): "base" the configured base model
# (agent.workspace.judge_model), "teacher" the [teacher] section's model (tuner.teacher); None off
Judge = Literal["base", "teacher"]


NO_TEACHER_JUDGE = (
    "no teacher is configured to judge with: set [teacher] base_url (an OpenAI-compatible "
    "server) and model, or model (a model folder), or adapter (a registry version); or judge "
    "with the base model (judge = 'base')"
)


def judge_choice(value: Any) -> Any:
    """`judge = true` (as before there was a choice) means "base"; false, "off" and "" off."""
    if value is True:
        return "base"
    if value is False or value in ("off", "", "none", "false"):
        return None
    if value == "true":
        return "base"
    if value is not None and value not in ("base", "teacher"):
        raise ValueError(
            f"judge must be 'base' (the base model), 'teacher' (the [teacher] model) or 'off', "
            f"got {value!r}"
        )
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def updated(self, **overrides: Any) -> Self:
        """A validated copy with `overrides` applied; None means "not given": keep the value.
        How a command's options override the config: an option left unset takes its value."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return self.model_validate({**self.model_dump(), **given}) if given else self


class ModelConfig(_Section):
    # "smollm2-135m-instruct" is the embedded default (converted by `selftune setup`);
    # anything else is a Hugging Face id or a local folder.
    name: str = DEFAULT_MODEL
    backend: Literal["local", "openai"] = "local"
    # openai backend: the server's URL (vLLM or any OpenAI-compatible server).
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(default=None, ge=1)
    max_new_tokens: int = Field(default=256, ge=1, le=32768)
    temperature: float = Field(default=0.0, ge=0.0, le=5.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    # micro-batcher: how long a request waits for company before its batch is generated.
    batch_wait_ms: float = Field(default=5.0, ge=0.0, le=1000.0)
    max_batch_size: int = Field(default=16, ge=1, le=512)
    # "auto": the model's own template when it renders tools, else selftune's.
    chat_template: Literal["auto", "selftune", "model"] = "auto"
    # what happens to a prompt longer than the model's context: refuse, or trim the oldest
    # turns (never the system turn or the last user turn) with a warning.
    overflow: Literal["error", "trim"] = "error"
    # KV states of prompt prefixes that rows share (system prompt, tools, demonstrations) are
    # computed once per adapter and reused; 0 turns it off. Prompts sharing fewer tokens than
    # prefix_cache_min_tokens are run without it.
    prefix_cache_entries: int = Field(default=8, ge=0, le=1024)
    prefix_cache_min_tokens: int = Field(default=32, ge=1)
    # "active": whatever the registry's gate promoted last (the base model if none); or a
    # version ("v3"), "base", or an adapter folder; or "routed": each request gets the active
    # adapter of its route (agent/model/router.py), the global active as the fallback
    adapter: str = "active"
    # "routed": the route classifier's confidence below which a request without a route
    # goes to the global active adapter
    router_threshold: float = Field(default=0.6, ge=0.0, le=1.0)


class SubagentConfig(_Section):
    name: str
    description: str
    system_prompt: str = "You are a helpful assistant."
    tools: list[str] = Field(default_factory=list)
    adapter: str | None = None
    max_steps: int = Field(default=6, ge=1)


class AgentConfig(_Section):
    system_prompt: str = "You are a helpful assistant. Use the tools when they help."
    tools: list[str] = Field(default_factory=lambda: ["calculator"])
    # modules whose `Tool`s (or @tool functions) are registered, e.g. "mypkg.tools"
    tool_modules: list[str] = Field(default_factory=list)
    max_steps: int = Field(default=8, ge=1, le=1000)
    tool_timeout_s: float = Field(default=30.0, gt=0)
    episode_timeout_s: float = Field(default=600.0, gt=0)
    max_subagent_depth: int = Field(default=2, ge=0, le=10)
    subagents: list[SubagentConfig] = Field(default_factory=list)


# The tuner's settings live here, not in tuner/: agent must not import tuner (the dependency
# rule), and one pydantic tree means one place that loads, validates and documents every key.
# tuner/ imports its sections from this module.

# Every linear projection of a Llama-style block (SmolLM2, Llama, Qwen, Mistral...).
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TrainConfig(_Section):
    """`[tuner.train]`: how one adapter is trained (SFT, DPO, KTO)."""

    lora_r: int = Field(default=16, ge=1, le=512)
    lora_alpha: int = Field(default=32, ge=1)
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: list(ALL_LINEAR))
    # the largest rank the serving side accepts (vLLM --max-lora-rank); lora_r must fit it
    max_lora_rank: int = Field(default=64, ge=1)
    # LoRA on ~100 rows: on calculator's improve dataset (89 rows, 24 steps) 2e-4 left the model
    # multiplying where it should add (57% zero-shot on test); 1e-3 reached 81.5%
    learning_rate: float = Field(default=1e-3, gt=0)
    epochs: float = Field(default=2.0, gt=0)
    max_steps: int = Field(default=-1, ge=-1)  # -1: epochs decide
    batch_size: int = Field(default=8, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    max_length: int = Field(default=1024, ge=16)
    # CPT (`tune cpt`): documents are packed and cut into blocks of this many tokens; every
    # token is trained, so the LM head's memory grows with batch_size x cpt_block x vocabulary
    # (SmolLM2, batch 8: 11 GB resident at 1024 tokens, 7 GB at 256)
    cpt_block: int = Field(default=256, ge=16)
    seed: int = 0
    save_steps: int = Field(default=25, ge=1)
    save_total_limit: int = Field(default=2, ge=1)
    logging_steps: int = Field(default=1, ge=1)
    # None = decide from the hardware / model: bf16 where the CPU or GPU supports it,
    # gradient checkpointing only for models of 1B parameters or more (it cost 1.6x on 135M).
    bf16: bool | None = None
    gradient_checkpointing: bool | None = None
    padding_free: bool = False
    # SFT batches of rows that start alike, their common start run once (tuner/prefix.py)
    share_prefix: bool = True
    beta: float = Field(default=0.1, gt=0)  # DPO / KTO temperature
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Sanity verdicts (tuner/sanity.py), checked before and after every tune; a failed one stops
    # the tune before the gate. Before: the share of SFT rows whose loss mask trains no token
    # (they are left out; none left stops at once), the share of rows that repeat an earlier
    # row, the share of rows from the commonest task. After: the median loss of the last
    # quarter of the logged steps must be below the first quarter's by this relative drop, and
    # the next-token log-probabilities on a fixed probe must move from the parent's by this much.
    max_empty_mask_share: float = Field(default=0.5, ge=0.0, le=1.0)
    max_duplicate_share: float = Field(default=0.5, ge=0.0, le=1.0)
    max_task_share: float = Field(default=0.5, ge=0.0, le=1.0)
    min_loss_drop: float = Field(default=0.0, ge=-1.0, lt=1.0)
    probe_min_change: float = Field(default=1e-3, ge=0.0)

    @model_validator(mode="after")
    def _rank_fits_serving(self) -> TrainConfig:
        from agent.serving.vllm import LORA_RANKS  # that module imports this one

        if self.lora_r > self.max_lora_rank:
            raise ValueError(
                f"lora_r={self.lora_r} is above max_lora_rank={self.max_lora_rank}: vLLM could not "
                "serve the adapter. Lower [tuner.train] lora_r, or raise max_lora_rank and start "
                f"vLLM with --max-lora-rank {self.lora_r} or more"
            )
        if self.max_lora_rank not in LORA_RANKS:
            raise ValueError(
                f"max_lora_rank={self.max_lora_rank} is not a value vLLM accepts: use one of "
                f"{', '.join(map(str, LORA_RANKS))}"
            )
        return self


class GrpoConfig(_Section):
    """`[tuner.grpo]`: one online GRPO run (rollouts by the agent, group-relative advantages)."""

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
    # also rank each group with the LLM judge (RULER-style), mixed 50/50: "base" the base model,
    # "teacher" the [teacher] model; true means "base", false off
    judge: Judge | None = None
    # where the rollouts run: "agent" = the agent's own backend (in process, or the [model]
    # server with the policy hot-loaded as a LoRA each step); "vllm" = a vLLM server the run
    # starts for itself, serving the policy's merged weights, reloaded in place each step
    rollout_engine: Literal["agent", "vllm"] = "agent"
    seed: int = 0
    # Sanity verdicts after a run (tuner/sanity.py): it stops before the gate when more than
    # this share of all groups were skipped (all-equal rewards: no signal), when the mean KL per
    # token to the start adapter (measured only with beta > 0) passes max_kl, or when the
    # policy's next-token log-probabilities on a fixed probe moved less than probe_min_change.
    max_skipped_share: float = Field(default=0.9, ge=0.0, le=1.0)
    max_kl: float = Field(default=1.0, gt=0.0)
    probe_min_change: float = Field(default=1e-3, ge=0.0)
    # which train tasks a step plays: "uniform" at random, or "solve-rate": those whose group
    # is most likely to disagree, by a Beta posterior of each task's solve rate from the run's
    # rollouts (its kind's rate as the prior), drawn Thompson-style so unseen tasks get tried
    task_picker: Literal["uniform", "solve-rate"] = "solve-rate"
    # DAPO's dynamic sampling: groups whose rewards are all equal carry no signal; roll out
    # more tasks (oversample per missing group) until tasks_per_step groups carry signal or
    # max_rounds rollouts were made in the step
    dynamic_sampling: bool = True
    max_rounds: int = Field(default=3, ge=1)
    oversample: float = Field(default=1.5, ge=1.0)
    # turn-level credit: in an episode with a positive advantage, a model turn whose tool calls
    # failed or whose results no later turn used gets this share of it (1.0: every turn alike)
    turn_credit: float = Field(default=0.5, ge=0.0, le=1.0)

    @field_validator("judge", mode="before")
    @classmethod
    def _judge(cls, value: Any) -> Any:
        return judge_choice(value)


class GateConfig(_Section):
    """`[tuner.gate]`: how much better a candidate must be, and how much worse it may not get."""

    # "mcnemar": promote only on a significant paired gain (exact McNemar test on the episodes
    # where the two models disagree, one-sided, at `alpha`); "margin": the old rule, the
    # candidate's pooled success rate must beat the active one's by `margin`
    test: Literal["mcnemar", "margin"] = "mcnemar"
    alpha: float = Field(default=0.05, gt=0.0, lt=1.0)
    margin: float = Field(default=0.05, ge=0.0, le=1.0)
    guard_margin: float = Field(default=0.05, ge=0.0, le=1.0)  # each environment's success
    # Guards are non-regression checks with a margin on the rate, not significance tests: a
    # one-sided test on 20-50 episodes lacks the power to see a 10-point drop, so "no
    # significant regression" would wave through the forgetting a guard is there to catch. The
    # burden is on the candidate: it may lose at most the margin, whatever the noise.
    # The general-ability probe (plain questions, no tools), run on every candidate as a guard
    # only (never part of the target); "" turns it off.
    probe: str = "general"
    probe_margin: float = Field(default=0.10, ge=0.0, le=1.0)
    # every environment an active or earlier-promoted adapter was gated on (the registry's
    # records) is a guard too, with `guard_margin`
    promoted_envs: bool = True
    flag_margin: float = Field(default=0.05, ge=0.0, le=1.0)  # reward-hacking flag rate
    grounded_margin: float = Field(default=0.10, ge=0.0, le=1.0)  # share of right answers grounded
    # robustness gap: clean minus perturbed success on the first `robustness_limit` test tasks of
    # each of the job's environments; the candidate's gap may exceed the active one's by at most
    # `robustness_margin`. [] turns it off; each perturbation costs limit episodes per model.
    robustness: list[str] = Field(default_factory=lambda: ["typos", "verbose"])
    robustness_limit: int = Field(default=16, ge=1)
    robustness_margin: float = Field(default=0.15, ge=0.0, le=1.0)

    @field_validator("robustness")
    @classmethod
    def _known_perturbations(cls, v: list[str]) -> list[str]:
        from agent.envs.perturb import parse_perturbations

        return parse_perturbations(",".join(v)) if v else []


class TunerConfig(_Section):
    train: TrainConfig = Field(default_factory=TrainConfig)
    grpo: GrpoConfig = Field(default_factory=GrpoConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    # the improve job's SFT dataset gets one messy copy of each solved task's row, its prompt
    # rewritten by one of these perturbations (agent/envs/perturb.py), drawn per task;
    # true = all five, false or [] = none
    augment_perturbed: list[str] = Field(default_factory=list)

    @field_validator("augment_perturbed", mode="before")
    @classmethod
    def _perturbation_names(cls, v: Any) -> Any:
        from agent.envs.perturb import PERTURBATIONS, parse_perturbations

        if v is True:
            return list(PERTURBATIONS)
        if v is False or v is None:
            return []
        if isinstance(v, str):
            v = v.split(",")
        if isinstance(v, list) and v:
            return parse_perturbations(",".join(str(x) for x in v))  # ValueError names the known
        return v


class ImproveConfig(_Section):
    """`[improve]`: the self-improvement job (`selftune improve`), and how it evaluates; the
    `selftune gate` command evaluates the same way."""

    envs: list[str] = Field(default_factory=lambda: ["calculator", "docs-qa"], min_length=1)
    cycles: int = Field(default=1, ge=1)
    method: Literal["sft", "dpo", "kto", "grpo"] = "sft"
    budget_minutes: float | None = Field(default=None, gt=0)  # start no new cycle after this
    collect_limit: int = Field(default=108, ge=1)  # train tasks per env per cycle (6 per kind)
    collect_samples: int = Field(default=1, ge=1)
    collect_temperature: float = Field(default=0.0, ge=0.0)
    few_shot: int = Field(default=2, ge=0)  # demonstrations while collecting, if weak
    hints: bool = True  # a wave with the tasks' hints for tasks failed without them
    # bootstrapping from reference answers alone (agent/envs/bootstrap.py): a wave that shows
    # failed tasks their answer and keeps what the tools reached (STaR's rationalisation), and
    # demonstrations written by calling the real tools when the environment has none
    rationalise: bool = True
    self_demos: bool = True
    # while the model is weak, train tasks with `search` are first played by the reference
    # policy (agent.envs.bootstrap.ReferencePolicy): it searches with the task's question and
    # answers the reference only when a returned passage holds it; tagged source:reference
    reference_wave: bool = True
    # replay against forgetting: each cycle the active model also plays these environments'
    # train tasks zero-shot, and its own right answers join the dataset beside the job's rows.
    # One cycle on search rows alone took the built-in `general` probe from 73.9 % to 26.1 %
    # (the adapter called `search` for every question); [] turns it off
    replay: list[str] = Field(default_factory=lambda: ["general"])
    # each replay task is played greedily and `replay_samples - 1` more times at
    # `replay_temperature`; the dataset keeps its shortest right answer (best of n). Greedy
    # alone kept the base's rambling right answers ('The opposite of "day" is "night" or
    # "night" is "night" is ...'), and adapters trained on them looped on the probe's
    # questions of that kind until the token limit, which the flags guard blocked
    replay_samples: int = Field(default=4, ge=1)
    replay_temperature: float = Field(default=0.7, ge=0.0, le=5.0)
    weak_below: float = Field(default=0.8, ge=0.0, le=1.0)  # zero-shot success under: weak
    eval_limit: int = Field(default=54, ge=1)  # held-out test tasks per environment
    concurrency: int = Field(default=16, ge=1)  # episodes at once (per model in the gate)
    max_train_steps: int = Field(default=-1, ge=-1)  # -1: [tuner.train]; grpo: [tuner.grpo]
    min_new_traces: int = Field(default=16, ge=1)  # fewer new passing traces: no training
    seed: int = 0
    # what a cycle learns from: "envs" plays the environments' train tasks; "traffic" learns
    # from what `selftune serve` recorded since `since` (7d, 12h, a date; None: all of it),
    # holding out `traffic_holdout` of the sessions for the gate (tuner/traffic.py); "both"
    # does both in one cycle: one dataset, gated on the tests and the held-out traffic
    source: Literal["envs", "traffic", "both"] = "envs"
    since: str | None = None
    traffic_holdout: float = Field(default=0.2, gt=0.0, lt=1.0)
    # traffic whose question matches no environment task is graded by the LLM judge: "base" the
    # base model (agent.workspace.judge_model, as `[tuner.grpo] judge`), "teacher" the [teacher]
    # model (a stronger judge); true means "base"; false (off): it stays ungraded
    judge: Judge | None = None
    # --method kto: the implicit signals the server recorded (the same question asked again, a
    # failed tool call) label the answer they point at False, where nothing stronger grades it
    weak_labels: bool = False
    # --source traffic|both: a question whose served answer missed a known good answer (a
    # correction, a matched task's reference) is played again through the collect waves, and a
    # right episode through the tools becomes its row (tuner/traffic.py, step 4); a bare
    # correction to a question that needs a tool is then not trained on
    traffic_replay: bool = True
    # "global": one adapter learns every environment and is promoted globally; "per-env": each
    # environment gets its own cycles on its own route (named for it), its adapter tuned from
    # and gated against that route's, and promoted on the route (routed experts, issue 22)
    routes: Literal["global", "per-env"] = "global"
    # per model call: a tool call takes ~30 tokens and an answer ~10, while a rambling base model
    # fills whatever it gets, and a batch lasts as long as its longest row
    max_tokens: int = Field(default=64, ge=1)

    @field_validator("judge", mode="before")
    @classmethod
    def _judge(cls, value: Any) -> Any:
        return judge_choice(value)


class TeacherConfig(_Section):
    """`[teacher]`: a stronger model that plays the train tasks the student failed, so the
    student is trained on its trajectories (distillation). Give one of:
    - `base_url` (any OpenAI-compatible server: vLLM, `selftune serve`, a hosted API) and the
      `model` name it serves (default: the first it lists);
    - `model` alone: a local model folder or Hugging Face id, run in this process;
    - `adapter` alone: a registry version ("v3") or adapter folder on the student's base model.
    Unset (the default): no teacher."""

    base_url: str | None = None
    model: str | None = None
    adapter: str | None = None
    # the NAME of the environment variable holding the key, never the key: config files, job
    # states and traces are shared, keys are not
    api_key_env: str = "OPENAI_API_KEY"
    few_shot: int = Field(default=0, ge=0)  # demonstrations the teacher sees (0: zero-shot)
    temperature: float = Field(default=0.0, ge=0.0, le=5.0)
    max_tokens: int | None = Field(default=None, ge=1)  # None: [improve] max_tokens
    concurrency: int = Field(default=8, ge=1)
    timeout_s: float = Field(default=10.0, gt=0)  # for the check that base_url answers

    @property
    def configured(self) -> bool:
        return bool(self.base_url or self.model or self.adapter)

    @field_validator("api_key_env")
    @classmethod
    def _a_name_not_a_key(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):  # `_explain` does not echo it
            raise ValueError(
                "api_key_env must be the name of an environment variable (e.g. TEACHER_API_KEY), "
                "not the key itself: export the key in that variable and name it here"
            )
        return value

    @model_validator(mode="after")
    def _one_kind_of_teacher(self) -> TeacherConfig:
        if self.base_url and self.adapter:
            raise ValueError(
                "with base_url, name the served adapter in [teacher] model, not adapter "
                "(adapter is for a registry version run on the student's base model)"
            )
        return self


class Config(_Section):
    home: Path = Path(".selftune")
    model: ModelConfig = Field(default_factory=ModelConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig)
    mcp: list[McpServerConfig] = Field(default_factory=list)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    traces: TracesConfig = Field(default_factory=TracesConfig)
    tuner: TunerConfig = Field(default_factory=TunerConfig)
    improve: ImproveConfig = Field(default_factory=ImproveConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    # where the config came from, for `selftune doctor`; not a user key
    source: str | None = Field(default=None, exclude=True)

    @property
    def workspace(self) -> Workspace:
        return Workspace(self.home)

    @model_validator(mode="after")
    def _mcp_timeouts_below_the_agents(self) -> Config:
        # the server's own timeout must fire first: only then is a hung server restarted
        for server in self.mcp:
            if server.timeout_s >= self.agent.tool_timeout_s:
                raise ValueError(
                    f"[[mcp]] '{server.name}' timeout_s = {server.timeout_s:g} must be below "
                    f"[agent] tool_timeout_s = {self.agent.tool_timeout_s:g}, or a hung server "
                    "is never restarted: lower the first or raise the second"
                )
        return self

    @model_validator(mode="after")
    def _a_teacher_judge_needs_a_teacher(self) -> Config:
        for key, judge in (("improve", self.improve.judge), ("tuner.grpo", self.tuner.grpo.judge)):
            if judge == "teacher" and not self.teacher.configured:
                raise ValueError(f"[{key}] judge = 'teacher': {NO_TEACHER_JUDGE}")
        return self


class Workspace:
    """The one folder a run writes to. Deleting it resets the project."""

    def __init__(self, root: Path | str):
        self.root = Path(root).expanduser().resolve()

    def ensure(self) -> Workspace:
        for d in (self.root, self.models, self.adapters, self.datasets, self.jobs, self.locks):
            d.mkdir(parents=True, exist_ok=True)
        return self

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def traces_db(self) -> Path:
        return self.root / "traces.db"

    @property
    def checkpoints_db(self) -> Path:
        return self.root / "checkpoints.db"

    @property
    def chroma(self) -> Path:
        return self.root / "chroma"

    @property
    def datasets(self) -> Path:
        return self.root / "datasets"

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    @property
    def router(self) -> Path:
        return self.root / "router.json"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    @property
    def locks(self) -> Path:
        return self.root / "locks"

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """`SELFTUNE_SECTION__KEY=value` -> {"section": {"key": value}}; values parse as JSON if they can.

    Only names with a `__` are config keys: `SELFTUNE_HOME` and other one-word variables (like
    `SELFTUNE_VLLM_PIP_ARGS`, read by the vLLM installer) belong to the programs that read them.
    """
    out: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith("SELFTUNE_") or "__" not in key:
            continue
        path = key[len("SELFTUNE_") :].lower().split("__")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys allowed at `loc` (the location of an unknown key), for the error message."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if hasattr(current, "model_fields") else None
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ()) or ()
        nxt = next(
            (a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None
        )
        if nxt is None:
            return []
        current = nxt
    return sorted(k for k in current.model_fields if k != "source")


def _key_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key of the tree as a dotted path ("tuner.gate.margin"), to point at a moved key."""
    paths = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            paths += _key_paths(ann, f"{prefix}{name}.")
        elif name != "source":
            paths.append(prefix + name)
    return paths


def _explain(err: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration in {origin}:"]
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "(root)"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(Config, loc)
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            elsewhere = [p for p in _key_paths(Config) if p.rsplit(".", 1)[-1] == loc[-1]]
            hint = (
                f" Did you mean '{close[0]}'?"
                if close
                else f" It is '{elsewhere[0]}' now."
                if elsewhere
                else ""
            )
            lines.append(f"  - unknown key '{key}'.{hint} Allowed keys here: {', '.join(allowed)}")
        else:  # a key typed where its variable's name belongs must not reach a log
            secret = bool(loc) and str(loc[-1]).endswith("api_key_env")
            shown = "(hidden)" if secret else repr(e.get("input"))
            lines.append(f"  - {key} = {shown}: {e['msg']}")
    return "\n".join(lines)


def load_config(
    path: str | Path | None = None,
    environ: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Load and validate the configuration.

    `path` (else `./selftune.toml` if it exists, else defaults), then `SELFTUNE_*` environment
    variables, then `overrides` (what the CLI's flags set). Raises ConfigError naming the key,
    the bad value and what is allowed.
    """
    environ = dict(os.environ if environ is None else environ)
    data: dict[str, Any] = {}
    origin = "defaults"
    if path is None and Path(CONFIG_FILENAME).is_file():
        path = Path(CONFIG_FILENAME)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist: create it or drop --config")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {p} is not valid TOML: {e}") from e
        origin = str(p)
    env = _env_overrides(environ)
    if env:
        data = _merge(data, env)
        origin += " + SELFTUNE_* environment"
    if overrides:
        data = _merge(data, overrides)
    if "SELFTUNE_HOME" in environ:
        data["home"] = environ["SELFTUNE_HOME"]
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_explain(e, origin)) from None
    cfg.source = origin
    return cfg
