"""Local backend speed: batched vs one-by-one generation, adapter switch, cold start.

    .venv/bin/python -m benchmarks.bench_backend [--requests 8] [--tokens 64]

(a) The same `--requests` chat requests, greedy, `--tokens` new tokens each (EOS ignored so
    every row generates the same count), answered one after another and then all at once
    through the micro-batcher: same engine, same run. Goal: batched >= 4x tokens/s.
(b) Adapter switch: load a saved random LoRA adapter (r=16, all linear) into the running
    engine and answer one short request with it. Goal: < 1 s.
(c) Cold start of `selftune chat hi --max-tokens 8` in a fresh process. Goal: < 10 s.
(d) Batch invariance on the agent's real prompts (tests/test_determinism.py's 8: system
    prompts, tool schemas, 0-2 worked examples, different lengths): greedy, answered alone and
    then as one batch of 8; how many rows are identical, and where the first differing row
    parts. `--dtype bfloat16` forces bf16 (on a CPU without avx512_bf16 it is emulated: slow,
    and its roundings may not match a native bf16 CPU's); `--only-agreement` runs (d) alone.
Prints a table and writes benchmarks/results/bench_backend.json (bench_backend-<dtype>.json
with --dtype).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from agent.config import load_config
from agent.model.engine import LocalEngine, Sampling
from agent.model.files import model_dir

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["dragons", "the sea", "a robot", "autumn", "a city", "trains", "the moon", "bread"]


def make_adapter(base: Path, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(base)),
        LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False),
    )
    model.save_pretrained(str(out))
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = base.name
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return out


def throughput(engine: LocalEngine, n: int, tokens: int) -> dict:
    prompts = [
        [{"role": "user", "content": f"Write a long story about {TOPICS[i % 8]}."}]
        for i in range(n)
    ]
    s = Sampling(max_tokens=tokens)
    eos = engine.eos_ids
    engine.eos_ids = set()  # every row generates exactly `tokens`, so both sides do equal work
    try:
        engine.generate(prompts[0], sampling=Sampling(max_tokens=4))  # warm-up
        t0 = time.perf_counter()
        seq = [engine.generate(p, sampling=s) for p in prompts]
        t_seq = time.perf_counter() - t0

        async def together():
            return await asyncio.gather(*[engine.agenerate(p, sampling=s) for p in prompts])

        before = len(engine.batcher.batch_sizes)
        t0 = time.perf_counter()
        bat = asyncio.run(together())
        t_bat = time.perf_counter() - t0
        sizes = engine.batcher.batch_sizes[before:]
    finally:
        engine.eos_ids = eos
    tok_seq = sum(c.completion_tokens for c in seq)
    tok_bat = sum(c.completion_tokens for c in bat)
    same = sum(
        a.completion_token_ids == b.completion_token_ids for a, b in zip(seq, bat, strict=True)
    )
    return {
        "requests": n,
        "new_tokens": tokens,
        "sequential_s": t_seq,
        "sequential_tok_s": tok_seq / t_seq,
        "batched_s": t_bat,
        "batched_tok_s": tok_bat / t_bat,
        "speedup": (tok_bat / t_bat) / (tok_seq / t_seq),
        "batch_sizes": sizes,
        "rows_identical_to_sequential": same,
    }


def agreement(engine: LocalEngine, tokens: int) -> dict:
    """Greedy tokens of the agent's real prompts alone vs in one batch of 8."""
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from test_determinism import agent_prompts

    prompts = agent_prompts()
    s = Sampling(max_tokens=tokens)
    engine.prefix_cache._entries.clear()
    t0 = time.perf_counter()
    alone = [engine.generate(m, t, sampling=s).completion_token_ids for m, t in prompts]
    t_alone = time.perf_counter() - t0
    engine.prefix_cache._entries.clear()
    wait, engine.batcher._wait_s = engine.batcher._wait_s, 2.0  # all 8 in one batch
    before = len(engine.batcher.batch_sizes)
    t0 = time.perf_counter()
    futures = [engine.submit(m, t, sampling=s) for m, t in prompts]
    together = [f.result().completion_token_ids for f in futures]
    t_batch = time.perf_counter() - t0
    engine.batcher._wait_s = wait
    parts = {}  # row -> the first token where batched and alone part
    for row, (a, b) in enumerate(zip(alone, together, strict=True)):
        if a != b:
            pairs = enumerate(zip(a, b, strict=False))
            parts[row] = next((i for i, (x, y) in pairs if x != y), min(len(a), len(b)))
    return {
        "prompts": len(prompts),
        "prompt_tokens": [len(engine.prompt_ids(m, t)) for m, t in prompts],
        "new_tokens": tokens,
        "batch_sizes": engine.batcher.batch_sizes[before:],
        "rows_identical": len(prompts) - len(parts),
        "first_difference_at_token": parts,
        "alone_s": t_alone,
        "batched_s": t_batch,
        "alone_tok_s": sum(map(len, alone)) / t_alone,
        "batched_tok_s": sum(map(len, together)) / t_batch,
    }


def adapter_switch(engine: LocalEngine, folder: Path) -> dict:
    q = [{"role": "user", "content": "hi"}]
    t0 = time.perf_counter()
    engine.load_adapter("bench", folder)
    t_load = time.perf_counter() - t0
    c = engine.generate(q, adapter="bench", sampling=Sampling(max_tokens=1))
    t_total = time.perf_counter() - t0
    engine.unload_adapter("bench")
    return {"load_s": t_load, "load_and_answer_s": t_total, "answer_tokens": c.completion_tokens}


def cold_start() -> dict:
    exe = ROOT / ".venv" / "bin" / "selftune"
    env = {**os.environ, "SELFTUNE_HOME": str(ROOT / ".selftune")}
    t0 = time.perf_counter()
    p = subprocess.run(
        [str(exe), "chat", "hi", "--max-tokens", "8"],
        cwd=tempfile.gettempdir(),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    wall = time.perf_counter() - t0
    return {"command": "selftune chat hi --max-tokens 8", "wall_s": wall, "rc": p.returncode,
            "stderr_tail": p.stderr[-300:]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--agreement-tokens", type=int, default=24)
    ap.add_argument("--dtype", default=None, help="force the engine's dtype (e.g. bfloat16)")
    ap.add_argument("--only-agreement", action="store_true", help="run (d) alone")
    args = ap.parse_args()
    environ = {"SELFTUNE_HOME": str(ROOT / ".selftune")}
    if args.dtype:
        environ["SELFTUNE_MODEL__DTYPE"] = args.dtype
    cfg = load_config(environ=environ)
    base = model_dir(cfg)
    engine = LocalEngine.from_config(cfg)
    # other work on the machine skews every figure here: record how busy it was
    res: dict = {"dtype": str(engine.dtype), "threads": torch.get_num_threads(),
                 "loadavg_before": os.getloadavg()}  # fmt: skip
    if not args.only_agreement:
        res["throughput"] = throughput(engine, args.requests, args.tokens)
        with tempfile.TemporaryDirectory() as tmp:
            res["adapter_switch"] = adapter_switch(engine, make_adapter(base, Path(tmp) / "ad"))
    res["agreement"] = agreement(engine, args.agreement_tokens)
    engine.close()
    if not args.only_agreement:
        res["cold_start"] = cold_start()
    res["loadavg_after"] = os.getloadavg()

    t = Table(title=f"local backend ({res['dtype']}, {res['threads']} threads)")
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_column("goal", justify="right")
    g = res["agreement"]
    t.add_row(
        f"agent prompts ({min(g['prompt_tokens'])}-{max(g['prompt_tokens'])} tokens), greedy "
        f"{g['new_tokens']}: rows identical alone vs batch {g['batch_sizes']}",
        f"{g['rows_identical']}/{g['prompts']}",
        "all",
    )
    t.add_row("  alone / batched tok/s", f"{g['alone_tok_s']:.1f} / {g['batched_tok_s']:.1f}", "")
    if args.only_agreement:
        _finish(res, t, args.dtype)
        return
    th = res["throughput"]
    t.add_row(
        f"sequential, {th['requests']} x {th['new_tokens']} tokens",
        f"{th['sequential_tok_s']:.1f} tok/s",
        "",
    )
    t.add_row(f"batched (batches {th['batch_sizes']})", f"{th['batched_tok_s']:.1f} tok/s", "")
    t.add_row("batched / sequential", f"{th['speedup']:.2f}x", ">= 4x")
    t.add_row(
        "rows identical to sequential", f"{th['rows_identical_to_sequential']}/{th['requests']}", ""
    )
    a = res["adapter_switch"]
    t.add_row("adapter load (r=16, all linear)", f"{a['load_s']:.2f} s", "")
    t.add_row("adapter load + answer", f"{a['load_and_answer_s']:.2f} s", "< 1 s")
    c = res["cold_start"]
    t.add_row(f"cold start: {c['command']} (rc {c['rc']})", f"{c['wall_s']:.2f} s", "< 10 s")
    _finish(res, t, args.dtype)


def _finish(res: dict, t: Table, dtype: str | None) -> None:
    Console().print(t)
    print(
        f"load average before/after: {res['loadavg_before'][0]:.1f} / {res['loadavg_after'][0]:.1f}"
    )
    name = f"bench_backend-{dtype}.json" if dtype else "bench_backend.json"
    out = ROOT / "benchmarks" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
