"""The gate's guards: the general-ability probe, the environments earlier promotions were gated
on, the flag and grounded rates and the robustness gap, each with its own margin and named when
it blocks; and planted destructive adapters (the real model, a real registry) rejected by them."""

from __future__ import annotations

import io

import pytest
from _tuner_fixtures import make
from rich.console import Console

from agent.config import GateConfig
from agent.envs.run import EpisodeOutcome, SuiteResult
from tuner.gate import decide, gate, guard_envs_for, promoted_envs, robustness_gap

# the rate-margin target, so that the guards alone decide in these tests
SETTINGS = GateConfig(test="margin", margin=0.05, guard_margin=0.05, probe_margin=0.10,
                      flag_margin=0.05, grounded_margin=0.10, robustness_margin=0.15)  # fmt: skip


def result(env: str, solved: int, n: int = 20, *, flags: dict[int, list[str]] | None = None,
           perturb: str | None = None) -> SuiteResult:  # fmt: skip
    """Tasks t0..t{n-1}, the first `solved` solved; `flags` task index -> its episode's flags."""
    flags = flags or {}
    outcomes = [
        EpisodeOutcome(f"t{i}", 0, f"{env}-{i}", "ok", float(i < solved), i < solved,
                       flags.get(i, []), 1, 10, 0.1, "x")
        for i in range(n)
    ]  # fmt: skip
    return SuiteResult(env=env, n=n, successes=solved, success_rate=solved / n, seed=0,
                       temperature=0.0, perturb=perturb, outcomes=outcomes,
                       flag_rate=sum(bool(f) for f in flags.values()) / n)  # fmt: skip


def test_the_probe_is_a_guard_outside_the_target_and_blocks_with_its_name():
    # calc gains 8 of 20; the probe falls 15/20 -> 10/20, past its 0.10 margin
    cand = [result("calc", 16), result("general", 10)]
    act = [result("calc", 8), result("general", 15)]
    r = decide(cand, act, SETTINGS, {"general": "probe"})
    assert "success_rate[calc]" in r.numbers and "success_rate[calc+general]" not in r.numbers
    assert r.numbers["success_rate[calc]"]["ok"]  # the target itself passed
    assert (
        r.numbers["success_rate[general]"] | {"guard": "probe", "ok": False}
        == (r.numbers["success_rate[general]"])
    )
    assert not r.promote and r.blocked_by == ["probe: success_rate[general]"]
    assert any(x.startswith("blocked by the probe guard") for x in r.reasons)
    # within its own margin (0.10) it passes, though guard_margin is 0.05
    ok = decide([result("calc", 16), result("general", 13)], act, SETTINGS, {"general": "probe"})
    assert ok.promote and ok.blocked_by == []


def test_flag_grounded_and_robustness_guards_each_use_their_own_margin():
    act = [result("docs", 10)]
    hacked = [result("docs", 16, flags={0: ["required_tool_not_called"], 1: ["truncated"]})]
    r = decide(hacked, act, SETTINGS)
    assert r.blocked_by == ["flags: flag_rate[docs]"]  # 0.10 flagged > flag_margin 0.05
    # 8 of 16 right answers not found in what was retrieved: grounded 1.0 -> 0.5
    guessed = [result("docs", 16, flags={i: ["ungrounded"] for i in range(8)})]
    r = decide(guessed, act, SETTINGS.model_copy(update={"flag_margin": 1.0}))
    assert r.numbers["grounded_rate[docs]"]["candidate"] == 0.5
    assert r.blocked_by == ["grounded: grounded_rate[docs]"]
    # robustness: on the first 10 tasks the candidate solves 10 clean and 2 perturbed (gap 0.8);
    # the active one solves 8 clean and 6 perturbed (gap 0.2)
    cand = [result("calc", 16), result("calc", 2, n=10, perturb="typos")]
    act = [result("calc", 8), result("calc", 6, n=10, perturb="typos")]
    r = decide(cand, act, SETTINGS)
    row = r.numbers["robustness_gap[calc]"]
    assert row["candidate"] == pytest.approx(0.8) and row["active"] == pytest.approx(0.2)
    assert r.blocked_by == ["robustness: robustness_gap[calc]"]
    assert robustness_gap(act[0], act[1:]) == pytest.approx(0.2)
    # the perturbed runs are guards only: the target is still calc's clean 16 vs 8
    assert r.numbers["success_rate[calc]"]["candidate"] == 0.8


def test_environments_earlier_promotions_were_gated_on_become_guards(tmp_path):
    reg = make(tmp_path, 3)
    quiet = Console(file=io.StringIO())
    # v1 passes the gate on calculator (with the probe as a guard) and becomes active
    gate(reg, "v1", [result("calculator", 15), result("general", 15)],
         [result("calculator", 5), result("general", 15)], settings=SETTINGS, active=None,
         guard_envs={"general": "probe"}, envs=["calculator"], console=quiet)  # fmt: skip
    assert reg.active().version == "v1"
    assert reg.get("v1").eval_results[-1]["envs"] == ["calculator"]
    assert promoted_envs(reg) == {"calculator": ["v1"]}  # the probe was only a guard
    # a job on docs-qa is guarded on calculator too, and on the probe
    guards = guard_envs_for(SETTINGS, reg, ["docs-qa"])
    assert guards == {"general": "probe", "calculator": "promoted"}
    assert guard_envs_for(SETTINGS, reg, ["calculator"]) == {"general": "probe"}
    off = SETTINGS.model_copy(update={"probe": "", "promoted_envs": False})
    assert guard_envs_for(off, reg, ["docs-qa"]) == {}
    # v2 is promoted on docs-qa, v1 retires: both environments stay guarded
    gate(reg, "v2", [result("docs-qa", 15), result("calculator", 15)],
         [result("docs-qa", 5), result("calculator", 15)], settings=SETTINGS, active="v1",
         guard_envs={"calculator": "promoted"}, envs=["docs-qa"], console=quiet)  # fmt: skip
    assert reg.get("v1").status == "retired"
    assert promoted_envs(reg) == {"calculator": ["v1"], "docs-qa": ["v2"]}
    # v3 wins docs-qa but forgets calculator, which only v1 was gated on: blocked, named
    out = io.StringIO()
    r = gate(reg, "v3", [result("docs-qa", 19), result("calculator", 9)],
             [result("docs-qa", 15), result("calculator", 15)], settings=SETTINGS, active="v2",
             guard_envs={"calculator": "promoted"}, envs=["docs-qa"],
             console=Console(file=out, width=200))  # fmt: skip
    assert not r.promote and r.blocked_by == ["promoted: success_rate[calculator]"]
    assert reg.get("v3").status == "rejected"
    text = out.getvalue()
    assert "blocked by: promoted: success_rate[calculator]" in text and "promoted" in text
    # a forced promotion was gated on nothing
    assert promoted_envs(make(tmp_path / "other", 1)) == {}


# -- planted destructive adapters, the real model and a real registry -------------------------


def _tool_call(i: int, expression: str) -> dict:
    call = {"id": f"call_{i}", "type": "function",
            "function": {"name": "calculator", "arguments": {"expression": expression}}}  # fmt: skip
    return {"role": "assistant", "content": "", "tool_calls": [call]}


def _write_rows(folder, rows: list[dict]):
    import json

    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "manifest.json").write_text(json.dumps({"kind": "sft", "rows": len(rows)}))
    return folder


def _plant_and_gate(cfg, dataset, steps: int, *, robustness: list[str]):
    """Train a LoRA on `dataset` (few steps, a high learning rate), register it, then gate it
    against the base model on calculator with the real guards."""
    import asyncio

    from agent.config import TrainConfig
    from tuner.gate import run_gate
    from tuner.train import tune

    rec = tune("sft", dataset, cfg, progress=False, out_dir=cfg.workspace.root / "planted",
               config=TrainConfig(batch_size=2, max_steps=steps, learning_rate=5e-3,
                                  max_length=256, save_steps=100, lora_r=8, lora_alpha=16))  # fmt: skip
    # the first 8 held-out tasks of calculator and of the probe (base: about three in four)
    cfg.improve = cfg.improve.updated(eval_limit=8, concurrency=16, max_tokens=24)
    # a call, its result, the answer: a planted adapter's tool-call loops end at 3 steps, not 8
    cfg.agent = cfg.agent.model_copy(update={"max_steps": 3})
    cfg.tuner.gate = cfg.tuner.gate.model_copy(
        update={"robustness": robustness, "robustness_limit": 2}
    )
    out = io.StringIO()
    r = asyncio.run(run_gate(cfg, rec.version, against="base", envs=["calculator"],
                             console=Console(file=out, width=200)))  # fmt: skip
    return rec.version, r, out.getvalue()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_an_adapter_that_answers_everything_with_a_tool_call_is_rejected_by_the_probe(cfg):
    from _tuner_fixtures import CALCULATOR

    from agent.envs import load_environment
    from tuner.registry import Registry

    # plain questions (the probe's train half: the gate plays its test half) and sums, every
    # one answered with a calculator call, with and without the tool on offer
    plain = [t.prompt for t in load_environment("general").split("train")]
    sums = [f"What is {a} * {b}?" for a, b in [(12, 34), (56, 7), (81, 9), (23, 45)]]
    rows = [
        {"messages": [{"role": "user", "content": q}, _tool_call(i, q)],
         **({"tools": [CALCULATOR]} if i % 2 else {})}
        for i, q in enumerate(plain + sums)
    ]  # fmt: skip
    version, r, text = _plant_and_gate(cfg, _write_rows(cfg.workspace.root / "ds", rows), 6,
                                       robustness=["typos"])  # fmt: skip
    probe = r.numbers["success_rate[general]"]
    assert probe["guard"] == "probe" and probe["candidate"] < probe["active"] - 0.10, probe
    assert not r.promote and "probe: success_rate[general]" in r.blocked_by, r.reasons
    assert "robustness_gap[calculator]" in r.numbers  # the perturbed runs went through the path
    assert "blocked by: " in text and "probe: success_rate[general]" in text
    rec = Registry(cfg.workspace.adapters).get(version)
    assert rec.status == "rejected" and rec.eval_results[-1]["guard_envs"] == {"general": "probe"}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_an_adapter_trained_only_on_calculator_that_breaks_the_probe_is_rejected(cfg):
    from _tuner_fixtures import write_dataset

    from tuner.registry import Registry

    dataset = write_dataset(cfg.workspace.root / "ds", "sft", n=24, seed=3)
    version, r, _ = _plant_and_gate(cfg, dataset, 8, robustness=[])
    probe = r.numbers["success_rate[general]"]
    assert probe["candidate"] < probe["active"] - 0.10, probe
    assert not r.promote and "probe: success_rate[general]" in r.blocked_by, r.reasons
    assert Registry(cfg.workspace.adapters).get(version).status == "rejected"
