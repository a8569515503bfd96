"""The eval gate: better candidates are promoted, broken ones are rejected and recorded; the
improve job and `selftune gate` both decide through the one `tuner.gate.gate`."""

from __future__ import annotations

import io

import pytest
from _tuner_fixtures import make
from rich.console import Console

from agent.config import GateConfig
from agent.envs.run import EpisodeOutcome, SuiteResult
from tuner.gate import GateError, compare_rates, decide, gate
from tuner.registry import Registry
from tuner.schemas import Guard

# the rate-margin rule, for the tests of the pooled target and guards; the paired test below
SETTINGS = GateConfig(test="margin", margin=0.05, guard_margin=0.05)


def summary(env: str, successes: int, n: int = 20, flag_rate: float = 0.0, **kw) -> SuiteResult:
    """A result with one outcome per task: tasks t0.. t{successes-1} solved, the rest not."""
    outcomes = [
        EpisodeOutcome(
            f"t{i}", 0, f"{env}-{i}", "ok", float(i < successes), i < successes, [], 1, 10, 0.1, "x"
        )  # fmt: skip
        for i in range(n)
    ]
    return SuiteResult(
        env=env,
        n=n,
        successes=successes,
        success_rate=successes / n,
        flag_rate=flag_rate,
        seed=kw.pop("seed", 0),
        temperature=0.0,
        outcomes=outcomes,
        **kw,
    )


def test_better_candidate_is_promoted():
    r = compare_rates(summary("calc", 15), summary("calc", 10), margin=0.05)
    assert r.promote
    row = r.numbers["success_rate[calc]"]
    assert row["active"] == 0.5 and row["candidate"] == 0.75 and row["ok"]
    assert row["delta"] == pytest.approx(0.25)


def test_broken_candidate_with_lower_success_is_rejected():
    r = compare_rates(summary("calc", 4), summary("calc", 10), margin=0.05)
    assert not r.promote
    assert "short of the margin" in r.reasons[0]


def test_gain_below_margin_is_rejected():
    r = compare_rates(summary("calc", 11), summary("calc", 10), margin=0.10)
    assert not r.promote  # +0.05 < 0.10


def test_guard_regression_rejects_even_with_higher_success():
    guards = {
        "success_rate[other]": Guard(0.40, 0.60, 0.05, True),  # fell by 0.2
        "flag_rate[calc]": (0.0, 0.0, 0.05, False),
    }
    r = compare_rates(summary("calc", 18), summary("calc", 10), margin=0.05, guards=guards)
    assert not r.promote
    assert r.numbers["success_rate[calc]"]["ok"]
    assert not r.numbers["success_rate[other]"]["ok"]
    assert any("guard: success_rate[other] regressed" in x for x in r.reasons)
    assert r.blocked_by == ["guard: success_rate[other]"]


def test_lower_is_better_guard():
    hacked = {"flag_rate[calc]": Guard(0.30, 0.0, 0.05, False)}
    assert not compare_rates(
        summary("calc", 18), summary("calc", 10), margin=0.05, guards=hacked
    ).promote
    fewer = {"flag_rate[calc]": Guard(0.0, 0.30, 0.05, False)}
    assert compare_rates(
        summary("calc", 18), summary("calc", 10), margin=0.05, guards=fewer
    ).promote


def test_different_seeds_cannot_be_compared():
    with pytest.raises(GateError, match="differ in seed"):
        compare_rates(summary("calc", 15, seed=1), summary("calc", 10, seed=2), margin=0.05)


def test_eval_summary_rejects_inconsistent_numbers():
    with pytest.raises(ValueError, match="does not match"):
        SuiteResult(env="calc", n=10, successes=5, success_rate=0.9)


def test_the_target_is_the_pooled_rate_and_every_environment_is_a_guard():
    # calc +4 of 20, chat -1 of 20: the pool gains 3 of 40 (0.075 >= 0.05), chat falls 0.05
    r = decide([summary("calc", 16), summary("chat", 9)], [summary("calc", 12), summary("chat", 10)],
              SETTINGS)  # fmt: skip
    assert r.promote and r.numbers["success_rate[calc+chat]"]["delta"] == pytest.approx(0.075)
    assert {"success_rate[calc]", "success_rate[chat]", "flag_rate[calc]"} <= set(r.numbers)
    # one environment is its own pool
    r = decide([summary("calc", 15)], [summary("calc", 10)], SETTINGS)
    assert r.promote and "success_rate[calc]" in r.numbers
    with pytest.raises(GateError, match="same environments"):
        decide([summary("calc", 15)], [], SETTINGS)


def test_gate_rejects_broken_candidate_and_records_every_number(tmp_path):
    reg = make(tmp_path, 2)
    reg.promote("v1", force=True)
    active = [summary("calc", 12), summary("chat", 10)]
    candidate = [summary("calc", 16), summary("chat", 3)]  # better at calc, broke chat
    out = io.StringIO()
    result = gate(reg, "v2", candidate, active, settings=SETTINGS, active="v1",
                  record={"job": "j1"}, console=Console(file=out, width=200))  # fmt: skip
    assert not result.promote and result.active == "v1" and result.candidate == "v2"
    assert reg.active().version == "v1"
    rec = reg.get("v2")
    assert rec.status == "rejected"
    stored = rec.eval_results[-1]
    assert stored["gate"]["numbers"]["success_rate[chat]"]["candidate"] == 0.15
    assert stored["active_version"] == "v1" and len(stored["candidate"]) == 2
    assert stored["job"] == "j1" and stored["candidate"][1]["per_task"]["t2"] == 1.0
    text = out.getvalue()
    assert "REJECT" in text and "success_rate[chat]" in text and "fail" in text


def test_gate_promotes_better_candidate_over_base(tmp_path):
    reg = make(tmp_path, 1)
    result = gate(reg, "v1", [summary("calc", 15)], [summary("calc", 5)], settings=SETTINGS,
                  active=None, console=Console(file=io.StringIO()))  # fmt: skip
    assert result.promote and result.active is None
    assert reg.active().version == "v1"
    assert reg.get("v1").eval_results[-1]["gate"]["promote"] is True


async def test_the_improve_job_decides_through_the_one_gate(tmp_path, monkeypatch):
    """ImproveJob's gate step: both models' results go to `tuner.gate.gate` (pooled target),
    land in the cycle's state and in the registry."""
    import sys

    from agent.config import load_config
    from tuner.improve import CycleState, ImproveJob

    make(tmp_path, 2)  # the workspace's registry: tmp_path/adapters
    cfg = load_config(environ={"SELFTUNE_HOME": str(tmp_path)})
    cfg.improve.envs = ["calc", "chat"]
    cfg.tuner.gate.test = "margin"  # four tasks gained of 40: the paired test would say "noise"
    cfg.tuner.gate.robustness = []
    pairs = {"calc": (summary("calc", 16), summary("calc", 12)),
             "chat": (summary("chat", 9), summary("chat", 10)),
             "general": (summary("general", 14), summary("general", 15))}  # fmt: skip
    seen = []

    async def evaluate_pair(cfg, candidate, active, envs, settings, *, guards=(), **kw):
        seen.append((candidate, active, list(envs), list(guards)))
        every = [*envs, *guards]
        return [pairs[e][0] for e in every], [pairs[e][1] for e in every]

    # the module, not `tuner.gate` the function that tuner/__init__ exports under its name
    monkeypatch.setattr(sys.modules["tuner.gate"], "evaluate_pair", evaluate_pair)
    job = ImproveJob(cfg, cfg.improve, Console(file=io.StringIO()))
    job.open(resume=False)
    job._agent = object()  # no model: the evaluations above are canned
    cycle = CycleState(index=1, candidate="v2")
    await job._gate(cycle)
    # the general-ability probe runs as a guard, outside the pooled target
    assert seen == [("v2", None, ["calc", "chat"], ["general"])]
    assert cycle.gate["promote"] and "success_rate[calc+chat]" in cycle.gate["numbers"]
    assert cycle.gate["numbers"]["success_rate[general]"]["guard"] == "probe"
    assert "general" not in cycle.evals["v2"]  # the learning curve holds the job's own envs
    assert cycle.evals["v2"]["chat"]["successes"] == 9 and cycle.evals["base"]["calc"]["n"] == 20
    rec = Registry(tmp_path / "adapters").get("v2")
    assert rec.status == "active" and rec.eval_results[-1]["job"] == job.state.id


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gate_command_evaluates_two_registry_versions_and_records_the_decision(cfg, cli_env):
    """`selftune gate v2` (against the active v1) on the real model, two held-out tasks each."""
    import subprocess
    import sys
    from pathlib import Path

    from _tuner_fixtures import real_adapter

    from agent.model.files import model_dir

    reg = Registry(cfg.workspace.adapters)
    for i in (1, 2):
        folder = real_adapter(cfg.workspace.root / f"lora{i}", model_dir(cfg))
        reg.register(folder, base_model="smollm2-135m-instruct", parent="v1" if i == 2 else None)
    reg.promote("v1", force=True)
    env = dict(cli_env, SELFTUNE_IMPROVE__MAX_TOKENS="16")
    # `python -m agent.cli` from this checkout: the `selftune` script may import another one
    args = [sys.executable, "-m", "agent.cli", "gate", "v2", "--env", "calculator",
            "--eval-limit", "2", "--concurrency", "4"]  # fmt: skip
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(args, env=env, cwd=root, capture_output=True, text=True, timeout=800)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rec = Registry(cfg.workspace.adapters).get("v2")
    stored = rec.eval_results[-1]
    assert stored["gate"]["candidate"] == "v2" and stored["active_version"] == "v1"
    assert stored["command"] == "selftune gate"
    assert all(s["split"] == "test" and s["n"] == 2 for s in stored["candidate"] + stored["active"])
    assert stored["candidate"][0]["adapter"] == "v2" and stored["active"][0]["adapter"] == "v1"
    promoted = stored["gate"]["promote"]
    assert rec.status == ("active" if promoted else "rejected")
    assert f"v2 vs v1: {'promoted' if promoted else 'rejected'}" in done.stdout
    # a fresh LoRA answers like v1 (also fresh): no gain, so no promotion
    assert not promoted and Registry(cfg.workspace.adapters).active().version == "v1"
    # nothing to compare against itself
    again = subprocess.run([*args[:5], "--against", "v2"], env=env, cwd=root, capture_output=True,
                           text=True)  # fmt: skip
    assert again.returncode == 1 and "reference itself" in again.stderr


def paired(env: str, solved: set[int], n: int = 54, kinds: tuple[str, ...] = ("a", "b")):
    """A result on tasks t0..t{n-1} with exactly the tasks in `solved` solved."""
    outcomes = [
        EpisodeOutcome(f"t{i}", 0, f"{env}-{i}", "ok", float(i in solved), i in solved, [], 1,
                       10, 0.1, "x", kind=kinds[i % len(kinds)])
        for i in range(n)
    ]  # fmt: skip
    return SuiteResult(env=env, n=n, successes=len(solved), success_rate=len(solved) / n,
                       seed=0, temperature=0.0, outcomes=outcomes)  # fmt: skip


PAIRED = GateConfig(test="mcnemar", alpha=0.05, guard_margin=0.05)


def test_a_significant_paired_gain_is_promoted():
    active = set(range(20))
    candidate = active | set(range(20, 30))  # won 10, lost none: p = 0.5 ** 10
    r = decide([paired("calc", candidate)], [paired("calc", active)], PAIRED)
    assert r.promote and r.numbers["mcnemar_p[calc]"]["candidate"] == pytest.approx(0.5**10)
    assert "won 10 and lost 0" in r.reasons[0] and "significant" in r.reasons[0]


def test_a_gain_inside_the_noise_is_rejected_though_it_beats_the_old_margin():
    active = set(range(20))
    candidate = (active - {0, 1}) | {20, 21, 22, 23, 24}  # won 5, lost 2: +3 of 54
    margin_rule = decide([paired("calc", candidate)], [paired("calc", active)], SETTINGS)
    assert margin_rule.promote  # +0.056 clears the fixed 0.05 margin
    r = decide([paired("calc", candidate)], [paired("calc", active)], PAIRED)
    assert not r.promote and "not significant" in r.reasons[0]
    assert r.numbers["mcnemar_p[calc]"]["candidate"] == pytest.approx(0.2265625)


def test_the_report_says_per_task_kind_where_the_candidate_won_and_lost():
    active = set(range(20))
    candidate = (active - {0, 2}) | {21, 23, 25, 27, 29, 31, 33, 35, 37, 39, 41, 43}
    r = decide([paired("calc", candidate)], [paired("calc", active)], PAIRED)
    # even task ids are kind "a", odd ones "b": the losses are a's, the wins b's
    assert r.by_kind == {"a": {"won": 0, "lost": 2, "tasks": 27},
                         "b": {"won": 12, "lost": 0, "tasks": 27}}  # fmt: skip
