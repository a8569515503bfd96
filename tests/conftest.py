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

# Under pytest-xdist (`make test` runs `-n auto`) each worker, and every `selftune` it starts,
# computes on one thread: two workers of two threads each on two cores spin against each other
# in OpenMP. A test process alone used about one core on average (most of a test is Python, not
# matmuls), so two one-thread workers finish the suite in little more than half the time.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("SELFTUNE_MODEL__THREADS", "1")


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


def pytest_collection_modifyitems(config, items):
    """Files that hold slow tests run first, each file's tests kept together: under xdist the
    minutes-long end-to-end tests start while the other worker clears the quick ones, instead of
    one of them starting last and running alone."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)
