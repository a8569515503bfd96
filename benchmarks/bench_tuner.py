"""LoRA SFT speed: TRL's SFTTrainer as selftune configures it vs a plain torch loop vs TRL's defaults.

Same model (SmolLM2-135M), same LoRA (r=16, all linear), same rows (tokenized once by TRL with
selftune's template), same batch, fp32, one epoch of `--steps` steps each, run side by side in
one process so the ratios compare like with like.

With `--bf16` (a CPU with avx512_bf16 or AMX) two more rows: selftune's trainer in bf16
(autocast; the LoRA weights and the optimizer stay fp32, as `[tuner.train] bf16` does), and
TRL's defaults as they are on such a CPU (stock loss, bf16, gradient checkpointing). Each row
gets its MFU: 6 x parameters x tok/s against a GEMM peak of its dtype measured in the same run.
tok/s counts every row's tokens: with a shared prefix (tuner/prefix.py, the default) a batch
computes its rows' common start once, so its "MFU" can pass what the matmuls could do.
`--dataset DIR` times one epoch of a real dataset (an improve job's cycle1-sft folder).

    .venv/bin/python -m benchmarks.bench_tuner [--steps 10] [--batch 4] [--padding-free] [--bf16] [--dataset DIR]

Prints a table and writes benchmarks/results/bench_tuner.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from agent.model.hardware import cpu_has_bf16
from tuner.schemas import TrainConfig
from tuner.train import build_trainer, lora_config

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / ".selftune" / "models" / "smollm2-135m-instruct"
RESULTS = ROOT / "benchmarks" / "results" / "bench_tuner.json"


def _dataset(folder: Path, n: int) -> Path:
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from _tuner_fixtures import write_dataset

    return write_dataset(folder, "sft", n=n, seed=1)


def _tokens(rows) -> int:
    return sum(len(r["input_ids"]) for r in rows)


def run_trl(name: str, ds: Path, work: Path, cfg: TrainConfig, stock: bool = False) -> dict:
    """Train one epoch with TRL's SFTTrainer built exactly as `tuner.train` builds it; `stock`
    swaps in TRL's own SFTTrainer class (its compute_loss runs the LM head everywhere)."""
    from transformers import PrinterCallback
    from trl import SFTTrainer

    trainer = build_trainer("sft", ds, base_model_dir=MODEL_DIR, work_dir=work / "t", config=cfg)
    if stock:
        trainer.__class__ = SFTTrainer
    trainer.remove_callback(PrinterCallback)
    tokens = _tokens(trainer.train_dataset)
    start = time.perf_counter()
    out = trainer.train()
    wall = time.perf_counter() - start
    return {"name": name, "steps": out.global_step, "tokens": tokens, "wall_s": wall}


def run_plain(ds: Path, work: Path, cfg: TrainConfig) -> dict:
    """The same rows through a hand-written loop: forward, backward, AdamW step."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    trainer = build_trainer("sft", ds, base_model_dir=MODEL_DIR, work_dir=work / "p", config=cfg)
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in trainer.train_dataset]
    pad = trainer.processing_class.pad_token_id
    del trainer
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.seed)
    base = AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), dtype=torch.float32)
    model = get_peft_model(base, lora_config(cfg))
    model.train()
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate
    )
    collate = DataCollatorForLanguageModeling(pad_token_id=pad)
    batches = [rows[i : i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]
    start = time.perf_counter()
    for batch in batches:
        b = collate(batch)
        loss = model(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]
        ).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    wall = time.perf_counter() - start
    return {
        "name": "plain torch loop",
        "steps": len(batches),
        "tokens": _tokens(rows),
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument(
        "--padding-free", action="store_true", help="also time TRL's padding_free batches"
    )
    parser.add_argument(
        "--bf16", action="store_true", help="also time bf16 training: selftune's and TRL's defaults"
    )
    parser.add_argument(
        "--dataset",
        type=Path,
        help="an SFT dataset folder to time instead of the synthetic rows (for example an "
        "improve job's cycle1-sft): one epoch of it; --steps is then ignored",
    )
    ns = parser.parse_args(argv)
    cfg = TrainConfig(
        batch_size=ns.batch,
        epochs=1,
        save_steps=10_000,
        logging_steps=1,
        bf16=False,
        max_length=512,
    )
    work = Path(tempfile.mkdtemp(prefix="bench_tuner-"))
    try:
        ds = _dataset(work / "ds", ns.steps * ns.batch) if ns.dataset is None else ns.dataset
        results = [run_plain(ds, work, cfg)]
        results.append(run_trl("TRL, selftune (head on trained cols)", ds, work, cfg))
        unshared = cfg.model_copy(update={"share_prefix": False})
        results.append(run_trl("TRL, selftune, no shared prefix", ds, work, unshared))
        results.append(run_trl("TRL, stock SFTTrainer loss", ds, work, cfg, stock=True))
        # TRL's default turns gradient checkpointing on; bf16 (its other default) is off here
        # because this CPU cannot run it natively
        gc = cfg.model_copy(update={"gradient_checkpointing": True})
        results.append(run_trl("TRL stock + checkpointing (default)", ds, work, gc, stock=True))
        if ns.bf16:
            if not cpu_has_bf16():
                raise SystemExit(
                    "--bf16: this CPU has no avx512_bf16 or AMX; bf16 would be emulated"
                )
            bf = cfg.model_copy(update={"bf16": True})
            results.append(run_trl("TRL, selftune, bf16 autocast", ds, work, bf))
            bf_unshared = bf.model_copy(update={"share_prefix": False})
            results.append(run_trl("TRL, selftune, bf16, no shared prefix", ds, work,
                                   bf_unshared))  # fmt: skip
            stock = bf.model_copy(update={"gradient_checkpointing": True})
            results.append(run_trl("TRL defaults (bf16 + checkpointing)", ds, work, stock,
                                   stock=True))  # fmt: skip
        if ns.padding_free:
            try:
                pf = cfg.model_copy(update={"padding_free": True})
                results.append(run_trl("TRL, padding_free", ds, work, pf))
            except Exception as e:  # noqa: BLE001 - report why it did not run, keep the rest
                results.append({"name": "TRL, padding_free", "error": f"{type(e).__name__}: {e}"})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    from benchmarks.bench_cycle import matmul_peak, model_params

    threads = torch.get_num_threads()
    peaks = {"fp32": matmul_peak(threads)}
    if ns.bf16:
        peaks["bf16"] = matmul_peak(threads, dtype=torch.bfloat16)
    params = model_params(MODEL_DIR)
    plain = results[0]["tokens"] / results[0]["wall_s"]
    rows = f"one epoch of {ns.dataset}" if ns.dataset else f"{ns.steps} steps"
    print(f"\nLoRA SFT, SmolLM2-135M, r=16 all linear, batch {ns.batch}, {rows}")
    print(f"{'trainer':38} {'tok/s':>8} {'wall s':>8} {'vs plain':>9} {'MFU':>6}")
    for r in results:
        if "error" in r:
            print(f"{r['name']:38} failed: {r['error'][:80]}")
            continue
        r["dtype"] = "bf16" if "bf16" in r["name"] else "fp32"
        r["tok_s"] = r["tokens"] / r["wall_s"]
        r["vs_plain"] = r["tok_s"] / plain
        r["mfu"] = 6 * params * r["tok_s"] / peaks[r["dtype"]]["peak_flops"]
        print(f"{r['name']:38} {r['tok_s']:8.1f} {r['wall_s']:8.1f} {r['vs_plain']:8.2f}x "
              f"{r['mfu']:6.1%}")  # fmt: skip
    by_name = {r["name"]: r for r in results if "tok_s" in r}
    ratios = {"shared_prefix_vs_not": (
        by_name["TRL, selftune (head on trained cols)"]["tok_s"]
        / by_name["TRL, selftune, no shared prefix"]["tok_s"]
    )}  # fmt: skip
    if ns.bf16:
        ours = by_name["TRL, selftune, bf16 autocast"]["tok_s"]
        ratios["selftune_bf16_vs_trl_defaults"] = (
            ours / by_name["TRL defaults (bf16 + checkpointing)"]["tok_s"]
        )
        ratios["selftune_bf16_vs_selftune_fp32"] = (
            ours / by_name["TRL, selftune (head on trained cols)"]["tok_s"]
        )
        ratios["shared_prefix_vs_not_bf16"] = (
            ours / by_name["TRL, selftune, bf16, no shared prefix"]["tok_s"]
        )
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    report = {
        "benchmark": "bench_tuner",
        "steps": ns.steps,
        "dataset": str(ns.dataset) if ns.dataset else "synthetic calculator rows",
        "batch": ns.batch,
        "dtype": "float32, and bf16 rows with --bf16",
        "cpu_bf16": cpu_has_bf16(),
        "params": params,
        "matmul_peaks": peaks,
        "ratios": ratios,
        "torch_threads": torch.get_num_threads(),
        "load_avg_at_end": os.getloadavg(),
        "results": results,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2))
    print(f"wrote {RESULTS}")
    return report


if __name__ == "__main__":
    main()
