"""One calculator cycle from scratch, step by step: minutes, tokens/s and MFU.

    .venv/bin/python -m benchmarks.bench_cycle [--env calculator] [--work NEW_DIR]
    .venv/bin/python -m benchmarks.bench_cycle --report-only --work DIR   # an existing workspace

Runs `python -m agent.cli improve ENV --fresh --cycles 1` in a fresh workspace (the converted
model linked in) as a subprocess, then reads the job's state.json: each step's wall seconds and
what the local engine computed in it (`CycleState.step_s`, `step_engine`, recorded by the run
itself). Steps: baselines (the grader check and both baselines), collect (every wave, replay
included), dataset, train, gate, reload.

Model-bound steps get tokens/s and MFU. The peak is a torch GEMM (float32, and bf16 where the CPU
has it: each step against the dtype it ran in) measured in this run,
before and after the job, with the engine's thread count (the best of a few sizes, among them
the model's own MLP shape). FLOPs per token: 2 x parameters for inference (attention's own
FLOPs left out), applied to every token the model computed (prefill without the cached prefix, plus one per row per
decode step, a finished row's idle slot included); 6 x (parameters + LoRA parameters) for
training (the usual convention; with the base frozen the real count is nearer 4x), applied to
the trained tokens: the dataset's mean row length (selftune's template, cut at max_length)
times the rows the steps consumed. Load on the machine skews minutes: the load average is
recorded; compare figures of one run.

Prints a table and writes benchmarks/results/bench_cycle.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from agent.model.hardware import cpu_has_bf16

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "bench_cycle.json"
MODEL_DIR = ROOT / ".selftune" / "models" / "smollm2-135m-instruct"
ENGINE_STEPS = ("baselines", "collect", "gate")


def matmul_peak(threads: int, repeats: int = 5, dtype: Any = None) -> dict[str, Any]:
    """Best GEMM FLOP/s (float32, or `dtype`) with `threads` threads, over a square size and
    SmolLM2's MLP up-projection at 512 and 8 rows (prefill and batch-8 decode)."""
    torch.set_num_threads(threads)
    dtype = dtype or torch.float32
    shapes = [(2048, 2048, 2048), (512, 576, 1536), (8, 576, 1536)]
    by_shape = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        for _ in range(2):
            a @ b  # warm-up
        loops = max(1, int(2e9 / (2 * m * k * n)))
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(loops):
                a @ b
            best = min(best, (time.perf_counter() - t0) / loops)
        by_shape[f"{m}x{k}x{n}"] = 2 * m * k * n / best
    peak = max(by_shape.values())
    return {"threads": threads, "dtype": str(dtype), "flops_by_shape": by_shape, "peak_flops": peak}


def model_params(model_dir: Path) -> int:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return sum(p.numel() for p in model.parameters())  # the tied head counted once


def lora_params(adapter_dir: Path) -> int:
    from safetensors import safe_open

    f = adapter_dir / "adapter_model.safetensors"
    if not f.is_file():
        return 0
    with safe_open(str(f), "pt") as t:
        return sum(_numel(t, k) for k in t.keys())


def _numel(t: Any, key: str) -> int:
    n = 1
    for d in t.get_slice(key).get_shape():
        n *= d
    return n


def trained_tokens(state: dict[str, Any], cycle: dict[str, Any]) -> dict[str, Any]:
    """Tokens the training steps consumed: mean tokenized row x rows seen (an estimate: padding
    is not counted)."""
    from transformers import AutoTokenizer

    from agent.model.template import encode_for_training

    ds = Path(cycle["dataset"]["dir"]) / "train.jsonl"
    m = cycle.get("train_metrics", {})
    if not ds.is_file() or not m.get("global_step"):
        return {}
    cfg = json.loads((Path(state["_adapter_dir"]) / "train_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    rows = [json.loads(line) for line in ds.read_text().splitlines() if line.strip()]
    lengths = [
        min(len(encode_for_training(tok, r["messages"], r.get("tools"))["input_ids"]),
            cfg["max_length"])
        for r in rows
    ]  # fmt: skip
    seen = m["global_step"] * cfg["batch_size"] * cfg.get("grad_accum", 1)
    seen = (
        min(seen, int(len(rows) * cfg["epochs"] + 0.999)) if cfg.get("max_steps", -1) < 0 else seen
    )
    mean = sum(lengths) / len(lengths)
    return {"rows": len(rows), "mean_row_tokens": mean, "rows_seen": seen, "tokens": mean * seen,
            "batch_size": cfg["batch_size"], "max_length": cfg["max_length"]}  # fmt: skip


def step_rows(state: dict[str, Any], params: int, peak: float) -> list[dict[str, Any]]:
    cycle = state["cycles"][0] if state["cycles"] else {}
    rows = []
    steps = [("baselines", state.get("baseline_s"), state.get("baseline_engine", {}))]
    for name, label in (("collect", "collect"), ("dataset", "dataset"), ("tune", "train"),
                        ("gate", "gate"), ("reload", "reload")):  # fmt: skip
        steps.append(
            (label, cycle.get("step_s", {}).get(name), cycle.get("step_engine", {}).get(name, {}))
        )
    for label, seconds, eng in steps:
        row: dict[str, Any] = {"step": label, "minutes": seconds / 60 if seconds else None}
        if label in ENGINE_STEPS and seconds and eng:
            computed = eng.get("prefill_tokens", 0) + eng.get("decode_row_steps", 0)
            row.update(
                kind="inference",
                requests=eng.get("requests"),
                batches=eng.get("batches"),
                prompt_tokens=eng.get("prompt_tokens"),
                prefill_tokens=eng.get("prefill_tokens"),
                generated_tokens=eng.get("completion_tokens"),
                computed_tokens=computed,
                engine_busy=eng.get("generate_s", 0) / seconds,
                generated_tok_s=eng.get("completion_tokens", 0) / seconds,
                computed_tok_s=computed / seconds,
                mfu=2 * params * computed / seconds / peak,
            )
        rows.append(row)
    return rows


def train_row(state: dict[str, Any], cycle: dict[str, Any], params: int, peak: float) -> dict:
    m = cycle.get("train_metrics", {})
    adapter = state.get("_adapter_dir")
    if not m.get("wall_s") or not adapter:
        return {}
    tokens = trained_tokens(state, cycle)
    if not tokens:
        return {}
    lora = lora_params(Path(adapter))
    tok_s = tokens["tokens"] / m["wall_s"]
    return {
        **tokens,
        "kind": "training",
        "steps": m["global_step"],
        "loop_s": m["wall_s"],
        "bf16": m.get("bf16"),
        "lora_params": lora,
        "train_tok_s": tok_s,
        "mfu": 6 * (params + lora) * tok_s / peak,
    }


def run_job(env: str, home: Path, extra: list[str]) -> float:
    (home / "models").mkdir(parents=True, exist_ok=True)
    link = home / "models" / MODEL_DIR.name
    if not link.exists():
        link.symlink_to(MODEL_DIR.resolve(), target_is_directory=True)
    cmd = [sys.executable, "-m", "agent.cli", "improve", env, "--fresh", "--cycles", "1", *extra]
    print(f"$ SELFTUNE_HOME={home} {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(home / "improve.log", "w") as log:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=dict(os.environ, SELFTUNE_HOME=str(home)), stdout=log, stderr=log
        )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (home / "improve.log").read_text()[-1500:]
        raise SystemExit(f"improve failed (rc {proc.returncode}); log {home}/improve.log:\n{tail}")
    return wall


def read_state(home: Path) -> dict[str, Any]:
    found = sorted(home.glob("jobs/improve-*/state.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no improve job under {home}/jobs: run without --report-only first")
    state = json.loads(found[-1].read_text())
    if "baseline_s" not in state:
        raise SystemExit(
            f"{found[-1]} records no per-step timings (a job from before they were recorded): "
            "run the benchmark without --report-only"
        )
    state["_file"] = str(found[-1])
    state["_adapter_dir"] = None
    if not state["cycles"]:  # stopped during the baselines: report what there is
        return state
    cycle = state["cycles"][0]
    adapter = found[-1].parent / ("cycle1" + (f"-{cycle['route']}" if cycle.get("route") else "")
                                  + "-adapter")  # fmt: skip
    cand = cycle.get("candidate")
    if cand and (home / "adapters" / cand).is_dir():
        adapter = home / "adapters" / cand
    state["_adapter_dir"] = str(adapter) if adapter.is_dir() else None
    return state


def success(state: dict[str, Any]) -> dict[str, Any]:
    base = next(iter(state["baseline"].get("base", {}).values()), None)
    cycle = state["cycles"][0] if state["cycles"] else {}
    cand = cycle.get("candidate")
    after = next(iter(cycle.get("evals", {}).get(cand, {}).values()), None) if cand else None
    pick = ("success_rate", "ci95", "n")
    return {
        "base": {k: base[k] for k in pick} if base else None,
        "candidate": {k: after[k] for k in pick} if after else None,
        "promoted": bool(cycle.get("gate", {}).get("promote")),
        "skipped": cycle.get("skipped"),
    }


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--env", default="calculator")
    ap.add_argument("--work", default=None, help="the workspace (default: a new temp folder)")
    ap.add_argument("--report-only", action="store_true", help="read --work's last job")
    ap.add_argument("improve_args", nargs="*", help="more `improve` options, after --")
    args = ap.parse_args(argv)
    if args.report_only and not args.work:
        raise SystemExit("--report-only reads a workspace: give it with --work DIR")
    home = Path(args.work or tempfile.mkdtemp(prefix="bench_cycle-")).resolve()
    load_before = os.getloadavg()
    wall = None
    if not args.report_only:
        if home.exists() and any(home.glob("jobs/improve-*")):
            raise SystemExit(f"{home} already holds a job: give a new --work, or --report-only")
        peak_before = matmul_peak(torch.get_num_threads())
        wall = run_job(args.env, home, args.improve_args)
    state = read_state(home)
    threads = state.get("engine", {}).get("threads") or torch.get_num_threads()
    peak = matmul_peak(threads)
    if not args.report_only:  # the machine's load moves the peak too: keep the better one
        peak["before_job"] = peak_before
        peak["peak_flops"] = max(peak["peak_flops"], peak_before["peak_flops"])
    params = model_params(MODEL_DIR)
    cycle = state["cycles"][0] if state["cycles"] else {}
    # each step's MFU against the peak of the dtype it ran in: bf16 where the CPU has it
    peaks = {"fp32": peak["peak_flops"]}
    if cpu_has_bf16():
        peaks["bf16"] = matmul_peak(threads, dtype=torch.bfloat16)["peak_flops"]
    engine_bf16 = "bfloat16" in str(state.get("engine", {}).get("dtype")) and "bf16" in peaks
    train_bf16 = bool(cycle.get("train_metrics", {}).get("bf16")) and "bf16" in peaks
    steps = step_rows(state, params, peaks["bf16" if engine_bf16 else "fp32"])
    train = train_row(state, cycle, params, peaks["bf16" if train_bf16 else "fp32"])
    for s in steps:
        if s["step"] == "train" and train:
            s.update(train)
    if wall is None:
        wall = (state.get("finished") or time.time()) - state["started"]
    report = {
        "benchmark": "bench_cycle",
        "env": args.env,
        "workspace": str(home),
        "state": state["_file"],
        "engine": state.get("engine"),
        "params": params,
        "matmul_peak": peak,
        "matmul_peaks": peaks,
        "mfu_against": {
            "inference": "bf16" if engine_bf16 else "fp32",
            "training": "bf16" if train_bf16 else "fp32",
        },  # fmt: skip
        "flops_per_token": "inference 2 x params on computed tokens; training 6 x (params + LoRA)",
        "steps": steps,
        "total_minutes": wall / 60,
        "success": success(state),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }

    t = Table(title=f"one {args.env} cycle from scratch ({state.get('engine', {}).get('dtype', '?')}"
              f", {threads} threads, peak GFLOP/s "
              + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peaks.items()) + ")")  # fmt: skip
    for col in ("step", "min", "share", "tokens (gen / computed)", "tok/s", "MFU", "engine busy"):
        t.add_column(col, justify="left" if col == "step" else "right")
    for s in steps:
        m = s["minutes"]
        share = _f(m / report["total_minutes"] if m else None, ".0%")
        if s.get("kind") == "inference":
            toks = f"{s['generated_tokens']} / {s['computed_tokens']}"
            rate = f"{s['generated_tok_s']:.1f} gen, {s['computed_tok_s']:.0f} all"
            t.add_row(s["step"], _f(m, ".2f"), share, toks, rate, f"{s['mfu']:.1%}",
                      f"{s['engine_busy']:.0%}")  # fmt: skip
        elif s.get("kind") == "training":
            t.add_row(s["step"], _f(m, ".2f"), share, f"{s['tokens']:.0f} trained",
                      f"{s['train_tok_s']:.0f} train", f"{s['mfu']:.1%}",
                      f"loop {s['loop_s'] / 60:.2f} min")  # fmt: skip
        else:
            t.add_row(s["step"], _f(m, ".2f"), share, "", "", "", "")
    t.add_row("total (the command's wall)", f"{report['total_minutes']:.2f}", "", "", "", "", "")
    Console().print(t)
    sc = report["success"]
    if sc["base"]:
        cand = sc["candidate"]
        print(
            f"success on {args.env} (held-out): base {sc['base']['success_rate']:.1%} -> "
            + (f"candidate {cand['success_rate']:.1%} {cand['ci95']}" if cand else "no candidate")
            + (" promoted" if sc["promoted"] else " not promoted")
        )
    print(f"load average before/after: {load_before[0]:.1f} / {report['loadavg_after'][0]:.1f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2))
    print(f"wrote {RESULTS}")
    return report


if __name__ == "__main__":
    main()
