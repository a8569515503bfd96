"""Eval throughput on the real model: concurrency 1 against 8, and base success rates.

    .venv/bin/python -m benchmarks.bench_eval [--limit 16] [--baseline --envs calculator docs-qa]

The same calculator test tasks run one episode at a time and eight at a time (the local
backend batches concurrent model calls into one `generate`), in one run on one loaded model.
With --baseline it also records the base model's zero-shot and 2-shot success rate on each
environment's test split. Prints tables and writes benchmarks/results/bench_eval.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]


async def measure(limit: int, baseline_envs: list[str], baseline_limit: int) -> dict:
    from agent.agent import Agent
    from agent.config import load_config
    from agent.envs.run import run_suite

    home = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    (home / "models").mkdir()
    (home / "models" / "smollm2-135m-instruct").symlink_to(
        ROOT / ".selftune/models/smollm2-135m-instruct"
    )
    cfg = load_config(environ={"SELFTUNE_HOME": str(home)})
    out: dict = {"throughput": {}, "baseline": {}}
    async with Agent(cfg, checkpoints=False) as agent:
        await run_suite(
            cfg, "calculator", limit=2, agent=agent, progress=False, max_tokens=96
        )  # warm-up
        for conc in (1, 8):
            r = await run_suite(
                cfg,
                "calculator",
                limit=limit,
                concurrency=conc,
                agent=agent,
                progress=False,
                max_tokens=96,
            )
            out["throughput"][conc] = {
                "episodes": r.n,
                "wall_s": r.wall_s,
                "episodes_per_s": r.n / r.wall_s,
                "tokens_per_s": r.mean_tokens * r.n / r.wall_s,
                "success_rate": r.success_rate,
            }
        for env in baseline_envs:
            for k in (0, 2):
                r = await run_suite(
                    cfg,
                    env,
                    limit=baseline_limit,
                    concurrency=8,
                    few_shot=k,
                    agent=agent,
                    progress=False,
                    max_tokens=128,
                )
                out["baseline"][f"{env} few-shot {k}"] = {
                    "n": r.n,
                    "success_rate": r.success_rate,
                    "ci95": r.ci95,
                }
    t = out["throughput"]
    out["speedup_8_over_1"] = t[8]["episodes_per_s"] / t[1]["episodes_per_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=16)
    p.add_argument("--baseline", action="store_true")
    p.add_argument("--envs", nargs="*", default=["calculator", "docs-qa", "delegate"])
    p.add_argument("--baseline-limit", type=int, default=40)
    a = p.parse_args()
    res = asyncio.run(measure(a.limit, a.envs if a.baseline else [], a.baseline_limit))
    console = Console()
    table = Table(
        "concurrency",
        "episodes",
        "wall s",
        "episodes/s",
        "tokens/s",
        title="eval calculator, base model",
    )
    for conc, r in res["throughput"].items():
        table.add_row(
            str(conc),
            str(r["episodes"]),
            f"{r['wall_s']:.1f}",
            f"{r['episodes_per_s']:.3f}",
            f"{r['tokens_per_s']:.0f}",
        )
    console.print(table)
    console.print(f"concurrency 8 over 1: {res['speedup_8_over_1']:.2f}x episodes/s")
    if res["baseline"]:
        bt = Table(
            "environment, mode", "n", "success", "95% CI", title="base SmolLM2 on the test split"
        )
        for k, r in res["baseline"].items():
            bt.add_row(
                k, str(r["n"]), f"{r['success_rate']:.1%}", f"{r['ci95'][0]:.0%}-{r['ci95'][1]:.0%}"
            )
        console.print(bt)
    path = ROOT / "benchmarks" / "results" / "bench_eval.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2))
    console.print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
