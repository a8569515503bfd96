"""GRPO with the agent as the rollout: advantages, the loss mask on real rollout token ids, a
real step on SmolLM2, equal groups and a throwing grader, and kill -9 / resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _tuner_fixtures import WORKED_EXAMPLE, toy_env

from agent.agent import Agent
from agent.config import GrpoConfig
from tuner.grpo import GrpoRun, TurnSample, collate, group_advantages, turn_samples
from tuner.registry import open_registry
from tuner.sanity import SanityError


def test_group_advantages_normalise_skip_equal_groups_and_cap_flagged():
    adv, why = group_advantages([1.0, 0.0, 0.0, 1.0], [False] * 4)
    assert why is None and adv == pytest.approx([1.0, -1.0, -1.0, 1.0])
    adv, why = group_advantages([0.5] * 4, [False] * 4)
    assert adv == [0.0] * 4 and "all 4 rewards equal" in why
    # a flagged winner gets no positive advantage; a flagged loser keeps its negative one
    adv, _ = group_advantages([1.0, 0.0, 1.0, 0.0], [True, True, False, False])
    assert adv[0] == 0.0 and adv[1] < 0 and adv[2] > 0
    assert group_advantages([1.0], [False])[1] == "fewer than 2 graded episodes"


def test_collate_left_pads_and_masks_only_completions():
    a = TurnSample([5, 6, 7, 4], [8, 9], 1.0)
    b = TurnSample([5], [8, 9, 10, 11], -1.0)
    batch = collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 4, 8, 9], [0, 5, 8, 9, 10, 11]]
    assert batch["loss_mask"].tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 1, 1]]
    assert batch["position_ids"].tolist()[1] == [0, 0, 1, 2, 3, 4]  # padding does not shift
    assert batch["keep"] == 5  # the longest completion + 1: the LM head runs on those only


@pytest.mark.slow
async def test_loss_mask_leaves_out_prompts_and_tool_results_of_a_real_rollout(cfg):
    cfg.model.max_new_tokens = 48
    async with Agent(cfg) as agent:
        res = await agent.run("What is 48 * 97?", tools=["calculator"], demos=WORKED_EXAMPLE)
        trace = agent.tracer.store.get(res.trace_id)
        tok = agent.engine.tokenizer
    samples = turn_samples(trace, advantage=1.0)
    assert len(samples) == 2  # the tool call, then the answer after the tool result
    batch = collate(samples, tok.pad_token_id)
    rows = zip(
        batch["input_ids"], batch["loss_mask"], batch["attention_mask"], samples, strict=True
    )
    for row, mask, attn, s in rows:
        trained = tok.decode([int(t) for t, m in zip(row, mask, strict=True) if m])
        masked = tok.decode(
            [int(t) for t, m, a in zip(row, mask, attn, strict=True) if a and not m]
        )
        # what is trained is exactly what the model generated in that turn (ids from the trace)
        assert trained == tok.decode(s.completion_ids)
        assert "What is 48 * 97?" in masked and "What is 48 * 97?" not in trained
    second = samples[1]
    second_masked = tok.decode(second.prompt_ids)  # all of it is masked (collate's mask above)
    # the calculator's result reached the model as a tool turn, and that turn is not trained on
    assert "4656" in second_masked and "tool" in second_masked
    assert "<tool_call>" in tok.decode(samples[0].completion_ids)


def test_merged_weights_are_peft_merge_under_the_checkpoint_names():
    import copy

    import torch
    from _runtime_fixtures import require_model
    from peft import get_peft_model
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from agent.config import TrainConfig
    from tuner.grpo import merged_state_dict
    from tuner.train import lora_config

    mdir = require_model()
    base = AutoModelForCausalLM.from_pretrained(str(mdir), dtype=torch.float32)
    model = get_peft_model(base, lora_config(TrainConfig(lora_r=8)))
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: B moved off its zero init
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    lora_before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    merged = merged_state_dict(model)
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    with safe_open(str(mdir / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    # exactly the base checkpoint's tensors (the tied lm_head is stored once), LoRA folded in
    assert set(merged) == names
    for k in names:
        torch.testing.assert_close(merged[k], expected[k])
    q = "model.layers.0.self_attn.q_proj.weight"
    with safe_open(str(mdir / "model.safetensors"), "pt") as f:
        assert not torch.allclose(merged[q], f.get_tensor(q).float())
    # the trainable adapter was not merged in place
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in lora_before.items())


def _lora_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.slow
async def test_one_grpo_step_on_the_real_model_changes_the_adapter(cfg, tmp_path):
    env = toy_env(tmp_path, ["words", "words2"])
    config = GrpoConfig(steps=1, group_size=4, tasks_per_step=2, max_tokens=24, temperature=1.0,
                    learning_rate=1e-3)  # fmt: skip
    run = GrpoRun(cfg, str(env), config)
    rec = await run.run()
    log = run.state.log[0]
    assert log["groups"] == 2 and log["skipped_groups"] == 0
    assert log["sequences"] > 0 and log["trained_tokens"] > 0 and log["update_s"] > 0
    # the candidate is in the registry with its lineage, and its weights moved off LoRA's init
    weights = _lora_weights(Path(rec.path))
    b = [v for k, v in weights.items() if "lora_B" in k]
    assert b and any(float(t.abs().max()) > 0 for t in b)  # B starts at zero
    assert rec.status == "candidate" and rec.train_config["method"] == "grpo"
    # every rollout is a stored trace tagged with its run and step
    from agent.workspace import open_store
    from traces.schemas import TraceQuery

    found = open_store(cfg).query(TraceQuery(tag="grpo-step:1", limit=None))
    assert len(found) == 8 and all(f"grpo:{run.state.id}" in t.tags for t in found)
    assert (run.dir / "reward.png").stat().st_size > 1000


@pytest.mark.slow
async def test_equal_groups_and_a_throwing_grader_are_skipped_and_logged(cfg, tmp_path):
    env = toy_env(tmp_path, ["boom", "flat"])
    config = GrpoConfig(steps=1, group_size=4, tasks_per_step=2, max_tokens=12)
    run = GrpoRun(cfg, str(env), config)
    # no group carried a signal: the sanity verdicts stop the run before the gate
    with pytest.raises(SanityError, match="grpo_skipped: 2 of 2 groups skipped"):
        await run.run()
    rec = open_registry(cfg).get(run.state.candidate)
    assert rec.status == "rejected"
    assert {v.name: v.ok for v in rec.verdicts} == {
        "grpo_skipped": False, "grpo_kl": True, "probe_changed": False,
    }  # fmt: skip
    log = run.state.log[0]
    assert log["groups"] == 2 and log["skipped_groups"] == 2
    assert log["grader_errors"] == 4 and log["sequences"] == 0
    reasons = " ".join(log["skipped"])
    assert "boom: fewer than 2 graded episodes" in reasons
    assert "flat: all 4 rewards equal (0.5)" in reasons


@pytest.mark.slow
def test_killed_grpo_run_resumes_at_the_next_step(cli_env, cfg, tmp_path):
    env = toy_env(tmp_path, ["words", "words2"])
    args = [sys.executable, "-m", "agent.cli", "tune", "grpo", str(env), "--steps", "3",
            "--group-size", "2", "--tasks-per-step", "2", "--max-tokens", "12", "--lr", "1e-3"]  # fmt: skip
    proc = subprocess.Popen(args, env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip
    runs = cfg.workspace.jobs
    deadline = time.time() + 600
    state = None
    while time.time() < deadline and proc.poll() is None:
        states = list(runs.glob("grpo-*/state.json"))
        if states and json.loads(states[0].read_text())["step"] >= 1:
            state = states[0]
            break
        time.sleep(0.5)
    assert state is not None, proc.stderr.read().decode()[-2000:] if proc.poll() else "no step"
    os.killpg(proc.pid, signal.SIGKILL)  # mid-way through step 2
    proc.wait()
    killed_at = json.loads(state.read_text())["step"]
    assert killed_at in (1, 2)
    out = subprocess.run([*args, "--resume"], env=cli_env, capture_output=True, text=True,
                         timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming GRPO run" in out.stderr and f"after step {killed_at}" in out.stderr
    final = json.loads(state.read_text())
    assert final["finished"] and final["step"] == 3
    assert [r["step"] for r in final["log"]] == [1, 2, 3]  # no step lost or run twice
    assert "registered v1 (candidate)" in out.stdout


def test_step_report_keeps_every_number_in_a_log_file():
    import io

    from rich.console import Console

    from tuner.grpo import StepLog, report

    buf = io.StringIO()  # not a terminal: a table would be squeezed into 80 columns
    log = StepLog(3, 0.792, 0.406, 0.79, 6, 3, 1, 2, 22, 900, 0.0123, 0.0, 7.04, 0.008, 28.9)
    log.skipped = ["calc-1: all 4 rewards equal (1)"]
    report(Console(file=buf), log)
    out = buf.getvalue()
    for part in ("step 3", "reward mean ± sd 0.792 ± 0.406", "skipped groups 3/6", "flagged 1",
                 "sequences 22", "loss +0.0123", "rollout 7.0 s", "update 28.9 s",
                 "skipped group calc-1", "2 episodes had grader errors"):  # fmt: skip
        assert part in out, (part, out)


def test_tune_grpo_options_default_to_the_config_and_override_it(monkeypatch, tmp_path):
    import typer
    from typer.testing import CliRunner

    import tuner.grpo
    from agent.cli.tune import tune_app

    seen = {}

    async def fake_grpo(cfg, env, config, **kw):
        seen.update(config=config, env=env, **kw)
        from types import SimpleNamespace

        return SimpleNamespace(version="v1", path="x", metrics={"steps": config.steps})

    monkeypatch.setattr(tuner.grpo, "grpo", fake_grpo)
    monkeypatch.setenv("SELFTUNE_HOME", str(tmp_path))
    monkeypatch.setenv("SELFTUNE_TUNER__GRPO__GROUP_SIZE", "6")
    monkeypatch.setenv("SELFTUNE_TUNER__GRPO__ROLLOUT_ENGINE", "vllm")
    monkeypatch.chdir(tmp_path)
    app = typer.Typer()
    app.add_typer(tune_app, name="tune")
    res = CliRunner().invoke(app, ["tune", "grpo", "calculator", "--steps", "2", "--lr", "1e-3"],
                             obj={})  # fmt: skip
    assert res.exit_code == 0, res.output
    config = seen["config"]
    assert config.group_size == 6 and config.rollout_engine == "vllm"  # from the config
    assert config.steps == 2 and config.learning_rate == 1e-3  # given
    assert config.tasks_per_step == 4 and config.judge is None  # the defaults
    assert "Next: `selftune gate v1`" in res.output


# -- dynamic sampling: the solve-rate picker, the group filter, turn-level credit -------------


def _env_of(tasks):
    from types import SimpleNamespace

    return SimpleNamespace(name="t", split=lambda split: tasks)


def _task(i: int, kind: str = "a"):
    from traces.schemas import Task

    return Task(id=f"t{i}", prompt=f"q{i}", answer="1", split="train", metadata={"kind": kind})


def test_solve_rates_pick_tasks_whose_groups_disagree():
    from tuner.grpo import SolveRates, pick_tasks, split_chance

    assert split_chance(0.5, 4) == pytest.approx(0.875)
    assert split_chance(1.0, 4) == 0.0 and split_chance(0.0, 4) == 0.0
    tasks = [_task(i, "easy" if i < 6 else "mid") for i in range(10)]
    rates = SolveRates({t.id: t.metadata["kind"] for t in tasks})
    for i in range(3):  # three tasks of the easy kind were always solved, one mid task half
        rates.observe(f"t{i}", [1.0] * 4)
    rates.observe("t6", [1.0, 0.0, 1.0, 0.0])
    assert rates.mean("t0") > 0.85 and rates.mean("t6") == pytest.approx(0.5)
    # never seen, but its kind is: it borrows the kind's rate
    assert rates.mean("t5") > 0.75 and rates.mean("t9") == pytest.approx(0.5)
    config = GrpoConfig(tasks_per_step=4, group_size=4, task_picker="solve-rate")
    picked = [t.id for s in range(20) for t in pick_tasks(_env_of(tasks), config, s, rates)]
    easy = sum(int(t[1:]) < 6 for t in picked)
    assert easy < len(picked) * 0.35  # uniform picking would give 60 %
    # the same seed, step and estimates give the same tasks; `exclude` and `n` are honoured
    again = pick_tasks(_env_of(tasks), config, 3, rates, n=3, exclude={"t6", "t7"})
    assert again == pick_tasks(_env_of(tasks), config, 3, rates, n=3, exclude={"t6", "t7"})
    assert len(again) == 3 and not {"t6", "t7"} & {t.id for t in again}
    # uniform ignores the estimates; fading keeps the rate and weakens the evidence
    uniform = config.model_copy(update={"task_picker": "uniform"})
    assert len(pick_tasks(_env_of(tasks), uniform, 1, rates)) == 4
    before = rates.mean("t0")
    rates.fade(0.5)
    assert rates.counts["t0"] == [2.0, 0.0] and rates.mean("t0") < before


def _fake_outcome(task_id, score, i):
    from types import SimpleNamespace

    return SimpleNamespace(
        task_id=task_id, score=score, success=score >= 0.5, flags=[], grade_error=None,
        grade_s=0.0, trace_id=f"{task_id}-{i}",
    )  # fmt: skip


class _Run:
    """The parts of GrpoRun that `step` reads: the real method on a policy-less stand-in."""

    def __init__(self, tasks, config):
        from tuner.grpo import RunState, SolveRates

        self.config, self.cfg = config, None
        self.rates = SolveRates({t.id: "a" for t in tasks})
        self.state = RunState("r", "t", None, {})
        self.policy = None


async def test_dynamic_sampling_replaces_all_equal_groups_until_the_batch_is_full(monkeypatch):
    import tuner.grpo as grpo
    from tuner.grpo import GrpoRun

    tasks = [_task(i) for i in range(12)]
    solvable = {"t1", "t4", "t7", "t10"}  # only these groups disagree
    rolled: list[list[str]] = []

    async def rollout(batch, policy, step):
        from types import SimpleNamespace

        rolled.append([t.id for t in batch])
        outs = [
            _fake_outcome(t.id, float(t.id in solvable and i % 2 == 0), i)
            for t in batch
            for i in range(4)
        ]
        return SimpleNamespace(outcomes=outs)

    monkeypatch.setattr(grpo, "update", lambda policy, samples, config: (0.0, 0.0, 0))
    monkeypatch.setattr(grpo, "turn_samples", lambda trace, adv, credit: [])
    store = type("S", (), {"get": lambda self, i: None})()
    config = GrpoConfig(tasks_per_step=2, group_size=4, max_rounds=10, oversample=2.0,
                        task_picker="uniform")  # fmt: skip
    log = await GrpoRun.step(_Run(tasks, config), rollout, store, _env_of(tasks), 1, "p")
    assert log.trained_groups >= 2 and log.rounds == len(rolled) > 1
    assert log.groups == sum(map(len, rolled))
    assert log.skipped_groups == log.groups - log.trained_groups
    assert len({t for r in rolled for t in r}) == sum(map(len, rolled))  # no task twice a step
    assert all("rewards equal" in why for why in log.skipped)
    # off: one round of tasks_per_step tasks, as before
    off = config.model_copy(update={"dynamic_sampling": False})
    rolled.clear()
    log = await GrpoRun.step(_Run(tasks, off), rollout, store, _env_of(tasks), 1, "p")
    assert log.rounds == 1 and len(rolled) == 1 and len(rolled[0]) == 2
    # the cap: no task ever disagrees, so it stops after max_rounds
    solvable.clear()
    rolled.clear()
    capped = config.model_copy(update={"max_rounds": 3})
    log = await GrpoRun.step(_Run(tasks, capped), rollout, store, _env_of(tasks), 1, "p")
    assert log.rounds == 3 and log.trained_groups == 0 and log.skipped_groups == log.groups


def _span(kind, start, parent="root", **kw):
    from traces.schemas import Span

    return Span(trace_id="tr", kind=kind, name=kind, start=start, end=start + 0.5,
                status=kw.pop("status", "ok"), parent_id=parent, **kw)  # fmt: skip


def _llm(start, completion, calls=(), messages=None, parent="root"):
    from traces.schemas import LlmData, ToolCall

    llm = LlmData(
        messages=messages or [{"role": "user", "content": "What is 48 * 97?"}],
        completion=completion,
        tool_calls=[ToolCall(id=f"c{i}", name="calculator") for i in range(len(calls))],
        prompt_token_ids=[1, 2],
        completion_token_ids=[3],
    )
    return _span("llm", start, parent, llm=llm)


def _tool(start, result, status="ok", parent="root"):
    from traces.schemas import ToolData

    return _span("tool", start, parent, tool=ToolData(name="calculator", result=result),
                 status=status)  # fmt: skip


def test_turn_credit_lowers_failed_and_unused_tool_turns_of_winning_episodes():
    from traces.schemas import Trace
    from tuner.grpo import wasted_turns

    failed = _llm(1, "<tool_call>...", calls=[1])
    good = _llm(3, "<tool_call>...", calls=[1])
    unused = _llm(5, "<tool_call>...", calls=[1])
    answer = _llm(7, "The answer is 4656.")
    spans = [
        failed, _tool(2, None, status="error"),
        good, _tool(4, "4656.0"),  # reused below as 4656
        unused, _tool(6, "1234"),  # nothing after it mentions 1234
        answer,
    ]  # fmt: skip
    trace = Trace(id="tr", spans=spans)
    assert wasted_turns(trace) == {failed.id, unused.id}
    samples = turn_samples(trace, 2.0, credit=0.25)
    assert [s.advantage for s in samples] == [0.5, 2.0, 0.5, 2.0]
    # a losing episode: every turn shares the blame; credit 1.0 turns it off
    assert [s.advantage for s in turn_samples(trace, -1.0, credit=0.25)] == [-1.0] * 4
    assert [s.advantage for s in turn_samples(trace, 2.0, credit=1.0)] == [2.0] * 4
    # a result that only repeats what the turn already saw is not "used"
    echo = _llm(1, "<tool_call>", calls=[1])
    trace = Trace(id="tr", spans=[echo, _tool(2, "48 * 97"), _llm(3, "48 * 97 is big")])
    assert wasted_turns(trace) == {echo.id}


@pytest.mark.slow
async def test_a_real_step_rolls_out_again_until_a_group_carries_signal(cfg, tmp_path):
    env = toy_env(tmp_path, ["flat", "words"])  # "flat" always scores 0.5: no signal
    config = GrpoConfig(steps=1, group_size=4, tasks_per_step=1, max_tokens=12,
                        task_picker="uniform", seed=1)  # fmt: skip
    run = GrpoRun(cfg, str(env), config)
    await run.run()
    log = run.state.log[0]
    assert log["trained_groups"] == 1 and log["sequences"] > 0
    assert log["rounds"] == log["groups"] and log["skipped_groups"] == log["groups"] - 1
    assert all(why.startswith("flat:") for why in log["skipped"])
    assert set(run.state.solve_rates) == {s.split(":")[0] for s in log["skipped"]} | {"words"}
