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
