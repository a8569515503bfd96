"""Training sanity verdicts on the real model and tokenizer: a tune that would learn nothing
stops before the gate with a message that says what happened and what to try, and every tune's
verdicts are stored in its registry record."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from _tuner_fixtures import CALCULATOR, calc_conversation, write_dataset

from agent.config import TrainConfig
from traces.datasets import Built, augment_rows
from traces.datasets import write_dataset as write_built
from tuner.sanity import (
    SanityError,
    duplicate_verdict,
    grpo_verdicts,
    loss_verdict,
    mask_verdict,
    task_share_verdict,
)
from tuner.train import build_trainer, train

SMALL = dict(batch_size=2, max_steps=1, max_length=256, learning_rate=1e-3)


def _built(tasks: list[str], *, env: str = "calculator") -> Built:
    """SFT rows from distinct calculator conversations, row i from task `tasks[i]`, as the
    dataset builder hands them to the writer."""
    rows, info = [], []
    for i, task in enumerate(tasks):
        rows.append({"messages": calc_conversation(10 + i, 20 + i), "tools": [CALCULATOR]})
        info.append(
            {"env": env, "task_id": task, "trace_ids": [f"tr{i}"], "label": None, "subagent": None}
        )
    return Built("sft", rows, info, [f"tr{i}" for i in range(len(tasks))], [])


def _user_only_dataset(folder: Path, n: int = 4) -> Path:
    """Rows with no assistant turn: the template renders them, but their loss mask is empty."""
    folder.mkdir(parents=True)
    with open(folder / "train.jsonl", "w") as f:
        for i in range(n):
            row = {"messages": [{"role": "user", "content": f"What is {i} + 1?"}], "tools": []}
            f.write(json.dumps(row) + "\n")
    return folder


# -- the rules, one function each -------------------------------------------------------------


def test_loss_rule_compares_quarter_medians_and_tolerates_noise():
    noisy_down = [1.2, 0.8, 1.1, 0.9, 0.95, 0.7, 0.85, 0.6, 0.75, 0.5, 0.65, 0.4]
    assert loss_verdict(noisy_down, 0.0).ok  # the last loss of a step is above several earlier
    flat = [0.9, 1.0, 0.95, 1.05] * 6
    v = loss_verdict(flat, 0.0)
    assert not v.ok and "did not go down" in v.message and "learning_rate" in v.message
    assert v.value == pytest.approx(0.0)  # medians of the first and last 6 steps: equal
    assert loss_verdict([1.0, 0.5], 0.0).ok  # too few to judge, and it says so
    assert "not judged" in loss_verdict([1.0, 0.5], 0.0).message
    assert not loss_verdict([1.0, math.nan, 0.5, 0.4], 0.0).ok
    assert loss_verdict([0.01, 0.02, 0.01, 0.02], 0.0).ok  # already fitted
    assert not loss_verdict([1.0, 0.9, 0.9, 0.8], 0.5).ok  # min_loss_drop is relative


def test_mask_duplicate_and_task_rules_name_the_rows():
    v = mask_verdict([5, 0, 7, 0], max_empty_share=0.5)
    assert v.ok and v.value == 0.5 and "rows 1, 3" in v.message
    assert not mask_verdict([5, 0, 0, 0], max_empty_share=0.5).ok
    assert not mask_verdict([0, 0], max_empty_share=1.0).ok  # none left: always a stop
    rows = [{"messages": [i % 2]} for i in range(6)]
    d = duplicate_verdict(rows, 0.5)
    assert not d.ok and d.value == pytest.approx(4 / 6) and "best_of_n" in d.message
    assert "rows 2, 3, 4, 5" in d.message
    t = task_share_verdict(["c:a"] * 7 + ["c:b"] * 3, 0.5)
    assert not t.ok and "c:a has 7 of 10" in t.message and "max_task_share" in t.message
    assert task_share_verdict(None, 0.5).ok  # no task ids: not measured


def test_grpo_rules_read_the_step_logs():
    log = [
        {"groups": 4, "skipped_groups": 4, "kl": 0.0},
        {"groups": 4, "skipped_groups": 3, "kl": 0.0},
    ]
    skipped, kl = grpo_verdicts(log, max_skipped=0.8, max_kl=1.0, beta=0.0)
    assert not skipped.ok and skipped.value == 7 / 8 and "group_size" in skipped.message
    assert kl.ok and kl.value is None and "beta = 0" in kl.message
    log[-1]["kl"] = 3.0
    assert not grpo_verdicts(log, max_skipped=1.0, max_kl=1.0, beta=0.1)[1].ok


# -- the real train path ----------------------------------------------------------------------


def test_an_empty_loss_mask_stops_before_training(tmp_path, model_path):
    """Rows with no assistant turn: real tokenizer, real template, nothing trained, no adapter."""
    ds = _user_only_dataset(tmp_path / "ds")
    out = tmp_path / "adapter"
    with pytest.raises(SanityError, match="loss mask of all 4 rows is empty.*max_length") as e:
        train("sft", ds, base_model_dir=model_path, out_dir=out, config=TrainConfig(**SMALL))
    assert [v.name for v in e.value.verdicts if not v.ok] == ["loss_mask"]
    assert not out.exists() and not (tmp_path / "adapter.work").exists()


def test_assistant_turns_cut_off_by_max_length_are_an_empty_mask(tmp_path, model_path):
    ds = write_dataset(tmp_path / "ds", "sft", n=4)
    with pytest.raises(SanityError, match="loss_mask.*empty"):
        train(
            "sft",
            ds,
            base_model_dir=model_path,
            out_dir=tmp_path / "a",
            config=TrainConfig(**{**SMALL, "max_length": 16}),  # the system turn alone is longer
        )


def test_a_dataset_dominated_by_one_task_stops_before_training(tmp_path, model_path):
    ds = write_built(_built(["t1"] * 8 + ["t2", "t3"]), tmp_path / "ds").path
    with pytest.raises(
        SanityError, match="task_share: the commonest task calculator:t1 has 8 of 10"
    ):
        train(
            "sft",
            ds,
            base_model_dir=model_path,
            out_dir=tmp_path / "a",
            config=TrainConfig(**SMALL),
        )
    # the same rows pass when the user says the environment has few tasks (checked as the
    # trainer is built, before any step)
    cfg = TrainConfig(**SMALL, max_task_share=0.9)
    trainer = build_trainer(
        "sft", ds, base_model_dir=model_path, work_dir=tmp_path / "w", config=cfg
    )
    share = next(v for v in trainer.verdicts if v.name == "task_share")
    assert share.ok and share.value == 0.8


def test_the_tune_command_exits_1_with_the_message(tmp_path, cli_env):
    ds = _user_only_dataset(tmp_path / "ds")
    run = subprocess.run(
        [sys.executable, "-m", "agent.cli", "tune", "sft", str(ds), "--max-steps", "1"],
        env=cli_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 1, run.stderr[-2000:]
    assert "loss mask of all 4 rows is empty" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.slow
def test_verdicts_are_in_the_record_and_an_unchanged_adapter_is_rejected(tmp_path, cfg):
    """A real small tune stores its verdicts; one whose learning rate rounds to nothing leaves
    the adapter answering like its parent, is registered rejected and stops before the gate."""
    from tuner.registry import open_registry
    from tuner.train import tune

    ds = write_built(_built([f"t{i}" for i in range(8)]), tmp_path / "ds").path
    rec = tune("sft", ds, cfg, config=TrainConfig(**SMALL), progress=False)
    names = {v.name: v for v in rec.verdicts}
    assert set(names) == {"loss_mask", "duplicates", "task_share", "loss_down", "probe_changed"}
    assert all(v.ok for v in rec.verdicts), [v.message for v in rec.verdicts]
    assert names["probe_changed"].value > 1e-3  # one real step moves the next-token log-probs
    assert names["task_share"].value == 1 / 8
    reread = open_registry(cfg).get(rec.version)  # from record.json
    assert [v.name for v in reread.verdicts] == [v.name for v in rec.verdicts]

    with pytest.raises(SanityError, match="probe_changed: .*answers like its parent") as e:
        tune(
            "sft",
            ds,
            cfg,
            from_version=rec.version,
            config=TrainConfig(**{**SMALL, "learning_rate": 1e-12}),
            progress=False,
        )
    assert "v2 (registered as rejected) stopped before the gate" in str(e.value)
    v2 = open_registry(cfg).get("v2")
    assert v2.status == "rejected" and v2.parent == rec.version
    probe = next(v for v in v2.verdicts if v.name == "probe_changed")
    assert not probe.ok and probe.value < 1e-3
    assert any("sanity verdicts" in n for n in v2.notes)


@pytest.mark.slow
def test_improve_turns_a_failed_verdict_into_a_stopped_cycle(tmp_path, cfg):
    """The improve job's tune step (in a process of its own) on an empty-mask dataset: the cycle
    is skipped with the verdict's message, and no candidate reaches the gate."""
    from rich.console import Console

    from tuner.improve import CycleState, ImproveJob

    ds = _user_only_dataset(tmp_path / "ds")
    job = ImproveJob(
        cfg, cfg.improve.updated(envs=["calculator"]), Console(file=open("/dev/null", "w"))
    )
    job.open(resume=False)
    cycle = CycleState(index=1, dataset={"dir": str(ds)})
    asyncio.run(job._tune(cycle))
    assert cycle.skipped and cycle.skipped.startswith("sanity check failed")
    assert "loss mask of all 4 rows is empty" in cycle.skipped
    assert cycle.candidate is None
    assert [v["name"] for v in cycle.train_metrics["verdicts"]][0] == "loss_mask"


# -- augment_perturbed ------------------------------------------------------------------------


def test_augmented_rows_are_perturbed_copies_of_solved_tasks(tmp_path):
    from tuner.improve import perturbed_copies

    built = _built(["t1", "t2", "t3"])
    built.rows.append({"messages": calc_conversation(5, 6), "tools": [CALCULATOR]})
    built.row_info.append(
        {"env": "calculator", "task_id": "t1", "trace_ids": ["s"], "label": None, "subagent": "r"}
    )
    names = ["typos", "case", "spacing", "verbose", "terse"]
    out = augment_rows(built, perturbed_copies(names, seed=0))
    assert len(out.rows) == 7  # one copy per orchestrator row; the subagent row stays alone
    for original, copy, meta in zip(
        out.rows[0:6:2], out.rows[1:6:2], out.row_info[1:6:2], strict=True
    ):
        assert meta["augment"] in names
        assert copy["messages"][0]["content"] != original["messages"][0]["content"]
        assert copy["messages"][1:] == original["messages"][1:]  # the answer is the same
    # deterministic: a resumed job rebuilds the same rows
    assert augment_rows(built, perturbed_copies(names, seed=0)).rows == out.rows
    res = write_built(out, tmp_path / "ds")
    manifest = res.manifest
    assert sum(manifest["counts"]["augmented"].values()) == 3
    assert [s.get("augment") for s in manifest["row_sources"]][:2] == [
        None,
        out.row_info[1]["augment"],
    ]
    assert manifest["row_sources"][0]["task_id"] == "t1"


def test_augment_perturbed_config_accepts_names_true_and_rejects_typos():
    from agent.config import TunerConfig

    assert TunerConfig(augment_perturbed=True).augment_perturbed == [
        "typos", "case", "spacing", "verbose", "terse",
    ]  # fmt: skip
    assert TunerConfig(augment_perturbed="case,terse").augment_perturbed == ["case", "terse"]
    assert TunerConfig().augment_perturbed == []
    with pytest.raises(ValueError, match="unknown perturbation caps"):
        TunerConfig(augment_perturbed=["caps"])
