"""The configuration the README documents is the one the code reads."""

from __future__ import annotations

import tomllib
from pathlib import Path

from agent.config import Config, load_config

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_block() -> str:
    text = README.read_text().split("Every key, with its default:", 1)[1]
    return text.split("```toml", 1)[1].split("```", 1)[0]


def test_readme_config_block_loads_and_names_every_key(tmp_path):
    (tmp_path / "selftune.toml").write_text(_readme_block())
    cfg = load_config(tmp_path / "selftune.toml", environ={})
    assert cfg.tuner.grpo_rollout_engine == "agent" and cfg.model.backend == "local"
    documented = tomllib.loads(_readme_block())
    for section in ("model", "agent", "retrieval", "traces", "tuner"):
        fields = set(type(getattr(cfg, section)).model_fields)
        # commented-out keys count as documented (threads has no default to write down)
        missing = fields - set(documented[section]) - {"threads", "subagents"}
        assert not missing, f"README's [{section}] lacks {sorted(missing)}"
    assert {"home"} <= set(documented) and set(Config.model_fields) - {"source"} <= set(documented)
