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
    assert config.tasks_per_step == 4 and config.judge is False  # the defaults
    assert "Next: `selftune gate v1`" in res.output
