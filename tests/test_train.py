"""Trainers on the real SmolLM2 model: each dataset kind trains, the adapter is a standard PEFT
folder that changes the model, and a killed job resumes from its last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _tuner_fixtures import write_dataset

from agent.config import ALL_LINEAR, TrainConfig
from agent.model.hardware import cpu_has_bf16
from tuner.prefix import MIN_SHARED, groups
from tuner.train import (
    TrainError,
    build_trainer,
    last_checkpoint,
    load_rows,
    save_every,
    total_steps,
    train,
    trainer_args,
)

ROOT = Path(__file__).resolve().parent.parent
# Few rows, short steps: the point is that each trainer accepts our rows, not learning.
TINY = dict(batch_size=2, max_steps=1, max_length=256, save_steps=50, learning_rate=1e-3)


def test_cpu_bf16_detection_reads_the_flags():
    assert cpu_has_bf16("flags\t\t: fpu sse avx512f avx512_bf16 avx2\n")
    assert cpu_has_bf16("flags : fpu amx_bf16 amx_tile\n")
    assert not cpu_has_bf16("flags\t\t: fpu sse avx2 avx512f avx512bw\n")


def test_train_config_from_section_and_errors():
    from agent.config import TunerConfig

    cfg = TunerConfig(train=TrainConfig(lora_r=32)).train.updated(max_steps=7)
    assert cfg.lora_r == 32 and cfg.max_steps == 7 and cfg.target_modules == ALL_LINEAR
    with pytest.raises(ValueError, match="above max_lora_rank.*--max-lora-rank"):
        TrainConfig(lora_r=128)
    with pytest.raises(ValueError, match="not a value vLLM accepts"):
        TrainConfig(max_lora_rank=48)
    with pytest.raises(ValueError, match="extra"):
        TrainConfig.model_validate({"lora_rank": 8})


@pytest.mark.parametrize("kind", ["sft", "dpo", "kto"])
def test_rows_load_and_are_checked_for_their_kind(tmp_path, kind):
    rows = load_rows(kind, write_dataset(tmp_path / kind, kind, n=4))
    assert len(rows) == 4
    other = {"sft": "dpo", "dpo": "kto", "kto": "sft"}[kind]
    with pytest.raises(TrainError, match=f"not a {other.upper()} dataset"):
        load_rows(other, tmp_path / kind)


def test_sft_trains_on_assistant_tokens_only(tmp_path, model_path):
    """The loss mask covers the tool call and the answer, never the user's question."""
    ds = write_dataset(tmp_path / "ds", "sft", n=2)
    trainer = build_trainer(
        "sft", ds, base_model_dir=model_path, work_dir=tmp_path / "w", config=TrainConfig(**TINY)
    )
    row = trainer.train_dataset[0]
    mask = [label != -100 for label in row["labels"]]  # TRL folds the assistant mask into labels
    tok = trainer.processing_class
    trained = tok.decode([t for t, m in zip(row["input_ids"], mask, strict=True) if m])
    untrained = tok.decode([t for t, m in zip(row["input_ids"], mask, strict=True) if not m])
    assert '<tool_call>{"name": "calculator"' in trained and "<|im_end|>" in trained
    assert "What is" in untrained and "What is" not in trained
    assert not trainer.args.bf16 or cpu_has_bf16()
    assert not trainer.args.gradient_checkpointing  # off for a 135M model: it costs 1.6x


def test_sft_loss_on_kept_columns_equals_the_full_head_loss(tmp_path, model_path):
    """The trainer runs the LM head only where a next token is trained, and the batch's common
    start once; the loss and its gradient must be what the full logits give."""
    import torch

    ds = write_dataset(tmp_path / "ds", "sft", n=4)
    trainer = build_trainer(
        "sft", ds, base_model_dir=model_path, work_dir=tmp_path / "w", config=TrainConfig(**TINY)
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    # a mixed batch, as the sampler draws them: row 0 starts otherwise (another role's prompt)
    batch["input_ids"][0, 0] = trainer.processing_class.convert_tokens_to_ids("Hello")
    parts = groups(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert sorted(len(g.rows) for g in parts) == [1, 3]
    model = trainer.model
    model.train()
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n][0]
    torch.nn.init.normal_(lora, std=0.02)  # LoRA B starts at zero: make its gradient non-trivial

    losses, grads, shared = [], [], []
    for share in (True, False):  # the rows' common start run once (tuner/prefix.py), or not
        trainer.share_prefix = share
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        losses.append(loss.item())
        grads.append(lora.grad.clone())
        shared.append(trainer.shared_tokens)
        lora.grad = None
    # rows 1-3 ran the system prompt and tool schemas once, row 0 alone plainly
    assert shared[0] >= 2 * MIN_SHARED and shared[1] == 0

    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits, labels = out.logits[:, :-1].float(), batch["labels"][:, 1:]
    full = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )
    full.backward()
    for loss, grad in zip(losses, grads, strict=True):
        assert loss == pytest.approx(full.item(), rel=1e-5)
        assert torch.allclose(grad, lora.grad, rtol=1e-4, atol=1e-7)
    assert (batch["labels"] != -100).float().mean() < 0.5  # most columns really were skipped


@pytest.mark.slow
def test_sft_adapter_is_standard_peft_and_changes_logits(tmp_path, model_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ds = write_dataset(tmp_path / "ds", "sft", n=4)
    result = train(
        "sft",
        ds,
        base_model_dir=model_path,
        out_dir=tmp_path / "adapter",
        config=TrainConfig(**TINY),
        progress=False,
    )
    out = result.adapter_dir
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("adapter_")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert (out / "chat_template.jinja").is_file()  # the template it was trained with
    assert not (out / "training_args.bin").exists()
    acfg = json.loads((out / "adapter_config.json").read_text())
    assert acfg["modules_to_save"] in (None, [])
    assert acfg["r"] == 16 and acfg["r"] <= 64
    assert sorted(acfg["target_modules"]) == sorted(ALL_LINEAR)
    assert acfg["base_model_name_or_path"] == str(model_path.resolve())  # a path that resolves
    assert result.metrics["global_step"] == 1 and result.metrics["last_loss"] > 0
    assert not (tmp_path / "adapter.work").exists()  # checkpoints cleaned after success

    base = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        before = base(ids).logits.clone()
        after = PeftModel.from_pretrained(base, str(out))(ids).logits
    assert (after - before).abs().max().item() > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_preference_trainers_accept_our_rows(tmp_path, model_path, kind):
    ds = write_dataset(tmp_path / "ds", kind, n=4)
    result = train(
        kind,
        ds,
        base_model_dir=model_path,
        out_dir=tmp_path / "adapter",
        config=TrainConfig(**TINY),
        progress=False,
    )
    assert result.metrics["global_step"] == 1
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_tune_cli_registers_and_continues_from_a_version(tmp_path, cfg, monkeypatch):
    """`selftune tune sft DS` registers v1; `--from v1` trains v1's weights further into v2."""
    import typer
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from agent.cli.tune import tune_app
    from tuner.registry import Registry

    ds = write_dataset(tmp_path / "ds", "sft", n=4)
    monkeypatch.setenv("SELFTUNE_HOME", str(cfg.workspace.root))
    for key, value in {"batch_size": 2, "max_length": 256, "learning_rate": 1e-3}.items():
        monkeypatch.setenv(f"SELFTUNE_TUNER__TRAIN__{key.upper()}", str(value))
    monkeypatch.chdir(tmp_path)
    app = typer.Typer()
    app.add_typer(tune_app, name="tune")
    run = CliRunner().invoke
    res = run(app, ["tune", "sft", str(ds), "--max-steps", "1"], obj={})
    assert res.exit_code == 0, res.output
    assert "registered v1" in res.output
    res = run(app, ["tune", "sft", str(ds), "--max-steps", "1", "--from", "v1"], obj={})
    assert res.exit_code == 0, res.output

    reg = Registry(cfg.workspace.adapters)
    v1, v2 = reg.get("v1"), reg.get("v2")
    assert v2.parent == "v1" and v1.status == v2.status == "candidate"
    assert v1.base_model == "smollm2-135m-instruct" and v1.dataset_hash
    assert v1.train_config["kind"] == "sft" and v1.train_config["batch_size"] == 2
    a = load_file(str(Path(v1.path) / "adapter_model.safetensors"))
    b = load_file(str(Path(v2.path) / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    # Same seed and rows: a fresh LoRA would reproduce v1 exactly. Continuing from v1 takes a
    # second Adam step (~lr per weight) on top of v1's first, so B grows further from zero.
    bkey = next(k for k in a if "lora_B" in k)
    assert a[bkey].abs().sum() > 0 and not (a[bkey] == b[bkey]).all()
    assert b[bkey].norm() > 1.2 * a[bkey].norm()
    res = run(app, ["tune", "sft", str(ds), "--from", "v9"], obj={})
    assert res.exit_code == 1 and "no adapter version v9" in res.output


@pytest.mark.slow
def test_killed_job_resumes_from_its_last_checkpoint(tmp_path, model_path):
    ds = write_dataset(tmp_path / "ds", "sft", n=8)
    out = tmp_path / "adapter"
    cfg = json.dumps({**TINY, "max_steps": 4, "save_steps": 1})
    cmd = [
        sys.executable,
        "-m",
        "tuner.train",
        "sft",
        str(ds),
        "--base-model-dir",
        str(model_path),
        "--out-dir",
        str(out),
        "--config-json",
        cfg,
        "--no-progress",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    work = tmp_path / "adapter.work"
    deadline = time.time() + 600
    # a checkpoint is complete once its trainer_state.json is written (the last file saved)
    while not list(work.glob("checkpoint-*/trainer_state.json")):
        assert proc.poll() is None, "the job ended before writing a checkpoint"
        assert time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    done = subprocess.run(
        [*cmd, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads(done.stdout.strip().splitlines()[-1])
    assert metrics["global_step"] == 4
    assert metrics["resumed_from"].startswith("checkpoint-")
    assert int(metrics["resumed_from"].split("-")[1]) < 4
    assert (out / "adapter_model.safetensors").is_file()


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, model_path):
    ds = write_dataset(tmp_path / "ds", "sft", n=2)
    with pytest.raises(TrainError, match="nothing to resume.*run without --resume"):
        train("sft", ds, base_model_dir=model_path, out_dir=tmp_path / "a", resume=True)


def test_checkpoints_scale_with_the_run():
    """Every save_steps, and at least twice per run: the default improve cycle (89 rows, batch
    8, 2 epochs = 24 steps) used to save at step 25, i.e. never, so a killed tune restarted."""
    cfg = TrainConfig()
    steps = total_steps(cfg, rows=89)
    assert steps == 24 and save_every(cfg, steps) == 12
    assert save_every(cfg, total_steps(cfg, rows=1000)) == 25  # long runs: every save_steps
    assert save_every(cfg, 3) == 1 and save_every(cfg, 2) == 1
    assert save_every(cfg, 1) == 25  # nothing to resume into: no checkpoint before the end
    assert total_steps(cfg.updated(max_steps=7), rows=89) == 7
    assert total_steps(cfg.updated(grad_accum=2), rows=89) == 12  # 12 batches -> 6 per epoch
    assert total_steps(cfg, rows=89, world_size=2) == 12
    args = trainer_args("sft", cfg, Path("/tmp/x"), device="cpu", big=False, steps=steps)
    assert args.save_steps == 12 and args.save_strategy == "steps"


def test_last_checkpoint_skips_a_partly_written_one(tmp_path):
    for step, files in (
        (2, ["trainer_state.json", "adapter_model.safetensors", "optimizer.pt"]),
        (3, ["adapter_model.safetensors"]),
    ):  # killed while saving step 3
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        for f in files:
            (d / f).write_text("x")
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert last_checkpoint(tmp_path / "missing") is None


def test_fsdp_accelerate_config_loads():
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / "tuner" / "accelerate" / "fsdp.yaml"))
    assert cfg.distributed_type.value == "FSDP"
    assert cfg.fsdp_config["fsdp_version"] == 2
    # rank 0 must gather the full LoRA weights to save one ordinary PEFT folder
    assert cfg.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
