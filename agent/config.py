"""selftune configuration: `selftune.toml` (or `--config FILE`) plus `SELFTUNE_*` overrides.

Every section is a small pydantic model that forbids unknown keys, so a typo is an error that
lists what is allowed instead of a setting that silently does nothing.

Environment overrides use double underscores between section and key:
`SELFTUNE_MODEL__BACKEND=openai`, `SELFTUNE_TRACES__OTLP_ENDPOINT=http://...`.
`SELFTUNE_HOME` sets the workspace folder.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from retrieval.schemas import RetrievalConfig
from tools.schemas import McpServerConfig
from traces.schemas import TracesConfig

DEFAULT_MODEL = "smollm2-135m-instruct"
CONFIG_FILENAME = "selftune.toml"


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who has to fix it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
    # version ("v3"), "base", or an adapter folder
    adapter: str = "active"


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


class TunerConfig(_Section):
    lora_r: int = Field(default=16, ge=1, le=256)
    lora_alpha: int = Field(default=32, ge=1)
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    # LoRA on ~100 rows: on calculator's improve dataset (89 rows, 24 steps) 2e-4 left the model
    # multiplying where it should add (57% zero-shot on test); 1e-3 reached 81.5%
    learning_rate: float = Field(default=1e-3, gt=0)
    epochs: float = Field(default=2.0, gt=0)
    max_steps: int = Field(default=-1)
    batch_size: int = Field(default=8, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    max_length: int = Field(default=1024, ge=64)
    seed: int = 0
    gate_margin: float = Field(default=0.05, ge=0.0, le=1.0)
    guard_margin: float = Field(default=0.05, ge=0.0, le=1.0)
    min_new_traces: int = Field(default=16, ge=1)
    # where GRPO's rollouts run (`tune grpo --rollout-engine`, `improve --method grpo`): "agent"
    # = the agent's backend; "vllm" = a vLLM server of the run's own, merged policy weights
    grpo_rollout_engine: Literal["agent", "vllm"] = "agent"


class Config(_Section):
    home: Path = Path(".selftune")
    model: ModelConfig = Field(default_factory=ModelConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig)
    mcp: list[McpServerConfig] = Field(default_factory=list)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    traces: TracesConfig = Field(default_factory=TracesConfig)
    tuner: TunerConfig = Field(default_factory=TunerConfig)
    # where the config came from, for `selftune doctor`; not a user key
    source: str | None = Field(default=None, exclude=True)

    @property
    def workspace(self) -> Workspace:
        return Workspace(self.home)


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
    def jobs(self) -> Path:
        return self.root / "jobs"

    @property
    def locks(self) -> Path:
        return self.root / "locks"

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """`SELFTUNE_SECTION__KEY=value` -> {"section": {"key": value}}; values parse as JSON if they can."""
    out: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith("SELFTUNE_") or key == "SELFTUNE_HOME":
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


def _explain(err: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration in {origin}:"]
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "(root)"
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_keys(Config, loc))
            lines.append(f"  - unknown key '{key}'. Allowed keys here: {allowed}")
        else:
            lines.append(f"  - {key} = {e.get('input')!r}: {e['msg']}")
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
