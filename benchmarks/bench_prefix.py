"""Prefix caching and batch size in the local engine, side by side in one process.

32 calculator test prompts with the environment's two demonstrations (what improve's first
collection wave sends: ~380 tokens, of which ~330 are shared), greedy, 40 new tokens:
- prefix cache off vs on, at batch 8 (same rows, same batches);
- with the cache on, batches of 8, 16 and 32.
Every configuration must give the same completions as the first.

    .venv/bin/python -m benchmarks.bench_prefix

Prints a table and writes benchmarks/results/bench_prefix.json.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from agent.envs import load_environment
from agent.envs.run import demo_messages
from agent.model.engine import LocalEngine, Sampling
from tools.builtins import calculator_tool

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / ".selftune" / "models" / "smollm2-135m-instruct"
RESULTS = ROOT / "benchmarks" / "results" / "bench_prefix.json"


def main() -> dict:
    env = load_environment("calculator")
    demos = demo_messages(env, 2)
    tools = [calculator_tool().schema()]
    msgs = [
        [
            {"role": "system", "content": env.system_prompt},
            *demos,
            {"role": "user", "content": t.prompt},
        ]
        for t in env.split("test")[:32]
    ]
    eng = LocalEngine(MODEL_DIR, threads=2, batch_wait_ms=1000)
    prompt_tokens = [len(eng.prompt_ids(m, tools)) for m in msgs]

    def run(batch: int, cache: bool) -> tuple[float, list[list[int]]]:
        eng.batcher._max_size = batch
        eng.prefix_cache.max_entries = 8 if cache else 0
        eng.prefix_cache._entries.clear()
        start = time.perf_counter()
        futures = [eng.submit(m, tools, sampling=Sampling(max_tokens=40)) for m in msgs]
        out = [f.result().completion_token_ids for f in futures]
        return time.perf_counter() - start, out

    run(8, True)  # warm-up
    rows, reference = [], None
    for name, batch, cache in (
        ("batch 8, prefix cache off", 8, False),
        ("batch 8, prefix cache on", 8, True),
        ("batch 16, prefix cache on", 16, True),
        ("batch 32, prefix cache on", 32, True),
    ):
        wall, out = run(batch, cache)
        reference = reference or out
        same = sum(a == b for a, b in zip(out, reference, strict=True))
        rows.append({"name": name, "wall_s": wall, "identical_rows": same})
    eng.close()
    base = rows[0]["wall_s"]
    print(
        f"\n32 prompts of {min(prompt_tokens)}-{max(prompt_tokens)} tokens, 40 new tokens, greedy"
    )
    print(f"{'configuration':28} {'wall s':>8} {'speed-up':>9} {'same rows':>10}")
    for r in rows:
        r["speedup"] = base / r["wall_s"]
        print(f"{r['name']:28} {r['wall_s']:8.2f} {r['speedup']:8.2f}x {r['identical_rows']:>7}/32")
    res = {"benchmark": "bench_prefix", "load_avg_at_end": list(os.getloadavg()), "results": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2))
    print(f"wrote {RESULTS}")
    return res


if __name__ == "__main__":
    main()
