"""Messy prompts: each perturbation is seeded, changes the text, and keeps what the answer
depends on (the numbers, and the names and codes in capitals)."""

from __future__ import annotations

import re

import pytest

from agent.envs import load_environment
from agent.envs.perturb import PERTURBATIONS, parse_perturbations, perturb

PROMPTS = [t.prompt for t in load_environment("calculator").split("test")[:40]]


@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_a_perturbation_keeps_the_numbers_and_is_seeded(name):
    changed = 0
    for i, prompt in enumerate(PROMPTS):
        messy = perturb(prompt, name, seed=3, key=str(i))
        assert messy == perturb(prompt, name, seed=3, key=str(i))
        assert re.findall(r"\d+(?:\.\d+)?", messy) == re.findall(r"\d+(?:\.\d+)?", prompt)
        changed += messy != prompt
    assert changed >= len(PROMPTS) // 2, f"{name} left most prompts as they were"


def test_typos_leave_capitalised_names_and_codes_alone():
    prompt = "What is the name of the Quillmoor product with code QA-450?"
    for seed in range(30):
        messy = perturb(prompt, "typos", seed)
        assert "Quillmoor" in messy and "QA-450" in messy


def test_an_unknown_perturbation_names_the_known_ones():
    assert parse_perturbations("typos, case") == ["typos", "case"]
    with pytest.raises(ValueError, match="choose from typos, case, spacing, verbose, terse"):
        parse_perturbations("typos,shouting")


@pytest.mark.slow
def test_eval_perturb_runs_the_same_tasks_clean_and_messy(cli_env):
    import json
    import subprocess
    import sys

    from traces.schemas import TraceQuery
    from traces.store import TraceStore

    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "eval", "calculator", "--limit", "2",
         "--perturb", "case", "--concurrency", "2", "--json"],
        env={**cli_env, "SELFTUNE_MODEL__MAX_NEW_TOKENS": "24"},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout)
    assert set(results) == {"clean", "case"} and results["case"]["perturb"] == "case"
    assert list(results["clean"]["per_task"]) == list(results["case"]["per_task"])
    store = TraceStore(f"{cli_env['SELFTUNE_HOME']}/traces.db")
    asked = {t.metadata.get("perturb"): t for t in store.query(TraceQuery(env="calculator"))}
    messy = store.get(asked["case"].id)
    first = next(s for s in messy.spans if s.kind == "llm")
    assert first.llm.messages[-1]["content"] == first.llm.messages[-1]["content"].lower()
