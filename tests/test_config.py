"""The configuration the README documents is the one the code reads; one tree holds every
setting, a typo names the closest key, and commands take their defaults from it."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel

from agent.config import Config, ConfigError, load_config

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_block() -> str:
    text = README.read_text().split("Every key, with its default:", 1)[1]
    return text.split("```toml", 1)[1].split("```", 1)[0]


def _missing(model: BaseModel, documented: dict, where: str) -> list[str]:
    """Keys of `model` the documented section lacks, sub-sections included."""
    # commented-out keys count as documented (no default to write down)
    optional = {"threads", "subagents", "bf16", "gradient_checkpointing", "budget_minutes", "since"}
    missing = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            missing += _missing(value, documented.get(name, {}), f"{where}.{name}")
        elif name not in documented and name not in optional:
            missing.append(f"{where}.{name}")
    return missing


def test_readme_config_block_loads_and_names_every_key(tmp_path):
    (tmp_path / "selftune.toml").write_text(_readme_block())
    cfg = load_config(tmp_path / "selftune.toml", environ={})
    assert cfg.tuner.grpo.rollout_engine == "agent" and cfg.model.backend == "local"
    # the tuner's and the job's documented values are their defaults
    assert cfg.tuner == Config().tuner and cfg.improve == Config().improve
    documented = tomllib.loads(_readme_block())
    for section in ("model", "agent", "retrieval", "traces", "tuner", "improve"):
        missing = _missing(getattr(cfg, section), documented[section], section)
        assert not missing, f"README's config block lacks {missing}"
    assert {"home"} <= set(documented) and set(Config.model_fields) - {"source"} <= set(documented)


def test_every_tuner_setting_is_settable_from_toml_and_the_environment(tmp_path):
    (tmp_path / "selftune.toml").write_text(
        "[tuner.train]\nlora_r = 8\n[tuner.grpo]\ngroup_size = 6\n"
        "[tuner.gate]\nmargin = 0.1\n[improve]\nmin_new_traces = 3\n"
    )
    cfg = load_config(
        tmp_path / "selftune.toml",
        environ={"SELFTUNE_TUNER__GRPO__JUDGE": "true", "SELFTUNE_IMPROVE__ENVS": '["calculator"]'},
    )
    assert cfg.tuner.train.lora_r == 8 and cfg.tuner.grpo.group_size == 6
    assert cfg.tuner.gate.margin == 0.1 and cfg.improve.min_new_traces == 3
    assert cfg.tuner.grpo.judge == "base" and cfg.improve.envs == ["calculator"]  # true: base


def test_an_unknown_key_names_the_closest_valid_one():
    with pytest.raises(
        ConfigError, match=r"unknown key 'tuner\.gate\.margn'\. Did you mean 'margin'"
    ):
        load_config(environ={"SELFTUNE_TUNER__GATE__MARGN": "0.1"})
    # a key that moved to another section: the error says where it is now
    with pytest.raises(ConfigError, match=r"It is 'improve\.min_new_traces' now"):
        load_config(environ={"SELFTUNE_TUNER__MIN_NEW_TRACES": "1"})


def test_updated_keeps_unset_values_and_validates_the_given_ones():
    train = load_config(environ={}).tuner.train
    assert train.updated(max_steps=None) is train
    assert train.updated(max_steps=3).max_steps == 3 and train.max_steps == -1
    with pytest.raises(ValueError, match="above max_lora_rank"):
        train.updated(lora_r=128)


def test_only_section_variables_are_config_keys_and_a_typo_names_the_closest(tmp_path):
    from agent.config import ConfigError, load_config

    cfg = load_config(
        environ={
            "SELFTUNE_HOME": str(tmp_path),
            "SELFTUNE_VLLM_PIP_ARGS": "--index-url http://127.0.0.1:1/simple",  # the installer's
            "SELFTUNE_MODEL__MAX_NEW_TOKENS": "64",
        }
    )
    assert cfg.model.max_new_tokens == 64
    with pytest.raises(ConfigError, match="max_new_tokens"):
        load_config(environ={"SELFTUNE_MODEL__MAX_NEW_TOKEN": "64"})


def test_an_mcp_timeout_at_or_above_the_agents_is_refused(tmp_path):
    from agent.config import ConfigError, load_config

    toml = tmp_path / "selftune.toml"
    toml.write_text('[[mcp]]\nname = "slow"\ncommand = "x"\ntimeout_s = 30\n')
    with pytest.raises(ConfigError, match="must be below .agent. tool_timeout_s = 30"):
        load_config(toml)
    toml.write_text(
        '[agent]\ntool_timeout_s = 60\n[[mcp]]\nname = "slow"\ncommand = "x"\ntimeout_s = 30\n'
    )
    assert load_config(toml).mcp[0].timeout_s == 30
