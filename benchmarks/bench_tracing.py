"""Tracing overhead: an episode's wall time with the tracer recording to SQLite vs not at all.

    .venv/bin/python -m benchmarks.bench_tracing [--tasks 6] [--rounds 2] [--few-shot 2]

One process, one loaded engine (the real SmolLM2), two agents that differ only in their tracer:
`Tracer(TraceStore(tmp/traces.db))` (what every episode pays: spans with the full messages and
token ids, the end of the trace waiting for its commit) and `Tracer.disabled()`. Each
calculator test task runs on both, greedy, one episode at a time, the order alternating per
pair so drifting load falls on both sides alike, each from an empty prefix cache. The overhead is the paired mean of
(traced - untraced) / untraced with a 95 % bootstrap interval; the recording's own cost is
also timed apart (the same spans written with no model in the loop), and each episode's CPU
time is compared too: both are moved far less than wall time by other jobs on the machine. Goal: <= 2 %.

Prints a table and writes benchmarks/results/bench_tracing.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from agent.agent import Agent
from agent.config import load_config
from agent.envs import load_environment
from agent.envs.run import demo_messages
from agent.workspace import get_engine
from traces.store import TraceStore
from traces.tracer import Tracer

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "bench_tracing.json"


def bootstrap_ci(xs: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(xs, k=len(xs))) for _ in range(n))
    return means[int(0.025 * n)], means[int(0.975 * n) - 1]


async def episode(agent: Agent, env, task, demos) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds: less moved by other jobs on the machine).
    Each starts with an empty prefix cache, or the second of a pair would find the whole
    prompt computed by the first."""
    agent.engine.prefix_cache._entries.clear()
    t0, c0 = time.perf_counter(), time.process_time()
    res = await agent.run(
        task.prompt, tools=env.tool_names, system_prompt=env.system_prompt, demos=demos,
        env=env.name, task_id=task.id, tags=["bench:tracing"], adapter="base",
        temperature=0.0, max_tokens=128,
    )  # fmt: skip
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if res.status != "ok":
        raise SystemExit(f"episode {task.id} ended {res.status}: {res.error}")
    return wall, cpu


def replay_recording(store_dir: Path, source: TraceStore, repeats: int) -> dict:
    """The recording alone: the traced episodes' spans written again through a fresh Tracer
    (queue, writer thread, one transaction per trace, the wait for its commit)."""
    tracer = Tracer(TraceStore(store_dir / "replay.db"))
    recorded = source.query(with_spans=True)
    t0 = time.perf_counter()
    n = 0
    for _ in range(repeats):
        for full in recorded:
            with tracer.trace(env=full.env, task_id=full.task_id) as t:
                for s in full.spans:
                    with tracer.span(s.kind, s.name, llm=s.llm, tool=s.tool):
                        pass
                t.finish(status="ok", answer=full.answer)
            n += 1
    tracer.flush()
    wall = time.perf_counter() - t0
    tracer.close()
    spans = sum(len(f.spans) for f in recorded) / len(recorded)
    return {"traces": n, "spans_per_trace": spans,
            "per_trace_ms": 1000 * wall / n}  # fmt: skip


async def main_async(args: argparse.Namespace) -> dict:
    cfg = load_config(environ={"SELFTUNE_HOME": str(ROOT / ".selftune")})
    env = load_environment("calculator", config=cfg.agent)
    tasks = env.split("test")[: args.tasks]
    demos = demo_messages(env, args.few_shot)
    engine = get_engine(cfg)
    tmp = Path(tempfile.mkdtemp(prefix="bench_tracing-"))
    store = TraceStore(tmp / "traces.db")
    traced = Agent(cfg, engine=engine, tracer=Tracer(store), checkpoints=False)
    bare = Agent(cfg, engine=engine, tracer=Tracer.disabled(), checkpoints=False)
    await traced.start()
    await bare.start()
    await episode(bare, env, tasks[0], demos)  # warm-up: first-call costs land on neither side
    pairs = []
    for r in range(args.rounds):
        for i, task in enumerate(tasks):
            first_traced = (i + r) % 2 == 0
            order = (traced, bare) if first_traced else (bare, traced)
            a = await episode(order[0], env, task, demos)
            b = await episode(order[1], env, task, demos)
            on, off = (a, b) if first_traced else (b, a)
            pairs.append({"task": task.id, "traced_s": on[0], "untraced_s": off[0],
                          "traced_cpu_s": on[1], "untraced_cpu_s": off[1]})  # fmt: skip
            print(f"{task.id}: traced {on[0]:.2f} s ({on[1]:.2f} s CPU), untraced {off[0]:.2f} s "
                  f"({off[1]:.2f} s CPU)", flush=True)  # fmt: skip
    await traced.aclose()
    await bare.aclose()
    rec = replay_recording(tmp, store, repeats=3)
    rel = [(p["traced_s"] - p["untraced_s"]) / p["untraced_s"] for p in pairs]
    rel_cpu = [(p["traced_cpu_s"] - p["untraced_cpu_s"]) / p["untraced_cpu_s"] for p in pairs]
    untraced_mean = statistics.fmean(p["untraced_s"] for p in pairs)
    return {
        "benchmark": "bench_tracing",
        "tasks": len(tasks),
        "rounds": args.rounds,
        "few_shot": args.few_shot,
        "pairs": pairs,
        "overhead_mean": statistics.fmean(rel),
        "overhead_ci95": bootstrap_ci(rel),
        "overhead_median": statistics.median(rel),
        "cpu_overhead_mean": statistics.fmean(rel_cpu),
        "cpu_overhead_ci95": bootstrap_ci(rel_cpu),
        "episode_mean_s": untraced_mean,
        "recording_alone": rec,
        "recording_share": rec["per_trace_ms"] / 1000 / untraced_mean,
        "loadavg_at_end": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--few-shot", type=int, default=2)
    res = asyncio.run(main_async(ap.parse_args(argv)))
    t = Table(title=f"tracing overhead, {len(res['pairs'])} paired calculator episodes")
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_column("goal", justify="right")
    t.add_row("episode wall, untraced (mean)", f"{res['episode_mean_s']:.2f} s", "")
    lo, hi = res["overhead_ci95"]
    t.add_row("traced vs untraced, paired mean [95 % CI]",
              f"{res['overhead_mean']:+.1%} [{lo:+.1%}, {hi:+.1%}]", "<= 2 %")  # fmt: skip
    t.add_row("traced vs untraced, median", f"{res['overhead_median']:+.1%}", "")
    lo, hi = res["cpu_overhead_ci95"]
    t.add_row("traced vs untraced, process CPU time [95 % CI]",
              f"{res['cpu_overhead_mean']:+.1%} [{lo:+.1%}, {hi:+.1%}]", "<= 2 %")  # fmt: skip
    r = res["recording_alone"]
    t.add_row(f"recording alone ({r['spans_per_trace']:.1f} spans/trace)",
              f"{r['per_trace_ms']:.1f} ms/trace", "")  # fmt: skip
    t.add_row("recording alone / episode", f"{res['recording_share']:.2%}", "<= 2 %")
    Console().print(t)
    print(f"load average at end: {res['loadavg_at_end'][0]:.1f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2))
    print(f"wrote {RESULTS}")
    return res


if __name__ == "__main__":
    main()
