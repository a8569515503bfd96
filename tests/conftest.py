"""Shared fixtures. Tests write only under tmp_path; they read the converted model that
`selftune setup` (run by `make test` before pytest) left in the repo's workspace."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.config import DEFAULT_MODEL, Config, load_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The converted SmolLM2 folder. Converts it once if `selftune setup` has not run."""
    from _runtime_fixtures import require_model

    return require_model()


@pytest.fixture
def cfg(tmp_path: Path, model_path: Path) -> Config:
    """A config whose workspace is tmp_path, with the shared converted model linked in."""
    home = tmp_path / "ws"
    (home / "models").mkdir(parents=True)
    (home / "models" / DEFAULT_MODEL).symlink_to(model_path, target_is_directory=True)
    return load_config(environ={"SELFTUNE_HOME": str(home)})


@pytest.fixture
def cli_env(cfg: Config) -> dict[str, str]:
    """Environment for running the `selftune` command in a subprocess against `cfg`."""
    env = dict(os.environ)
    env["SELFTUNE_HOME"] = str(cfg.workspace.root)
    return env


@pytest.fixture
def scripted(monkeypatch):
    """Make the agent talk to a scripted chat model: `scripted(AIMessage(...), call(...), ...)`."""
    from _agent_fixtures import scripted_fixture

    return scripted_fixture(monkeypatch)
