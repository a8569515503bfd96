"""The eval gate: better candidates are promoted, broken ones are rejected and recorded."""

from __future__ import annotations

import io

import pytest
from _tuner_fixtures import make
from rich.console import Console

from tuner.gate import GateError, decide, gate
from tuner.schemas import EvalSummary, Guard


def summary(env: str, successes: int, n: int = 20, flag_rate: float = 0.0, **kw) -> EvalSummary:
    return EvalSummary(
        env=env,
        n=n,
        successes=successes,
        success_rate=successes / n,
        flag_rate=flag_rate,
        seed=kw.pop("seed", 0),
        sampling={"temperature": 0.0},
        **kw,
    )


def test_better_candidate_is_promoted():
    r = decide(summary("calc", 15), summary("calc", 10), margin=0.05)
    assert r.promote
    row = r.numbers["success_rate[calc]"]
    assert row["active"] == 0.5 and row["candidate"] == 0.75 and row["ok"]
    assert row["delta"] == pytest.approx(0.25)


def test_broken_candidate_with_lower_success_is_rejected():
    r = decide(summary("calc", 4), summary("calc", 10), margin=0.05)
    assert not r.promote
    assert "short of the margin" in r.reasons[0]


def test_gain_below_margin_is_rejected():
    r = decide(summary("calc", 11), summary("calc", 10), margin=0.10)
    assert not r.promote  # +0.05 < 0.10


def test_guard_regression_rejects_even_with_higher_success():
    guards = {
        "success_rate[other]": Guard(0.40, 0.60, 0.05, True),  # fell by 0.2
        "flag_rate[calc]": (0.0, 0.0, 0.05, False),
    }
    r = decide(summary("calc", 18), summary("calc", 10), margin=0.05, guards=guards)
    assert not r.promote
    assert r.numbers["success_rate[calc]"]["ok"]
    assert not r.numbers["success_rate[other]"]["ok"]
    assert any("guard success_rate[other] regressed" in x for x in r.reasons)


def test_lower_is_better_guard():
    hacked = {"flag_rate[calc]": Guard(0.30, 0.0, 0.05, False)}
    assert not decide(summary("calc", 18), summary("calc", 10), margin=0.05, guards=hacked).promote
    fewer = {"flag_rate[calc]": Guard(0.0, 0.30, 0.05, False)}
    assert decide(summary("calc", 18), summary("calc", 10), margin=0.05, guards=fewer).promote


def test_different_seeds_cannot_be_compared():
    with pytest.raises(GateError, match="differ in seed"):
        decide(summary("calc", 15, seed=1), summary("calc", 10, seed=2), margin=0.05)


def test_eval_summary_rejects_inconsistent_numbers():
    with pytest.raises(ValueError, match="does not match"):
        EvalSummary(env="calc", n=10, successes=5, success_rate=0.9)


def _evaluator(table: dict):
    calls = []

    def evaluate(name):
        calls.append(name)
        return table[name]

    return evaluate, calls


def test_gate_rejects_broken_candidate_and_records_every_number(tmp_path):
    reg = make(tmp_path, 2)
    reg.promote("v1", force=True)
    evaluate, calls = _evaluator(
        {
            "v1": [summary("calc", 12), summary("chat", 10)],
            "v2": [summary("calc", 16), summary("chat", 3)],  # better at calc, broke chat
        }
    )
    out = io.StringIO()
    result = gate(
        "v2", evaluate, reg, margin=0.05, guard_margin=0.05, console=Console(file=out, width=200)
    )
    assert calls == ["v1", "v2"]  # both evaluated in the same run, active first
    assert not result.promote
    assert reg.active().version == "v1"
    rec = reg.get("v2")
    assert rec.status == "rejected"
    stored = rec.eval_results[-1]
    assert stored["gate"]["numbers"]["success_rate[chat]"]["candidate"] == 0.15
    assert stored["active_version"] == "v1" and len(stored["candidate"]) == 2
    text = out.getvalue()
    assert "REJECT" in text and "success_rate[chat]" in text and "fail" in text


def test_gate_promotes_better_candidate_over_base(tmp_path):
    reg = make(tmp_path, 1)
    evaluate, calls = _evaluator({None: summary("calc", 5), "v1": summary("calc", 15)})
    result = gate(
        "v1", evaluate, reg, margin=0.05, guard_margin=0.05, console=Console(file=io.StringIO())
    )
    assert calls == [None, "v1"] and result.promote and result.active is None
    assert reg.active().version == "v1"
    assert reg.get("v1").eval_results[-1]["gate"]["promote"] is True
