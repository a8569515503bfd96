"""Agent step overhead: what the graph and the tracing add per step, the model held fixed.

    .venv/bin/python -m benchmarks.bench_agent [--episodes 60] [--latency-ms 20]

Each episode is a model call that asks for the calculator, the tool call, and a model call
that answers (3 steps). The model is a function that sleeps a fixed time and returns a fixed
message, so everything else measured is ours: the LangGraph loop, message conversion, tool
validation and span recording. Tracing on and off are interleaved in one run. Prints a table
and writes benchmarks/results/bench_agent.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


async def measure(episodes: int, latency_s: float) -> dict:
    from _agent_fixtures import Scripted, call
    from langchain_core.messages import AIMessage

    import agent.model as backends
    from agent.agent import Agent
    from agent.config import load_config
    from traces.store import TraceStore
    from traces.tracer import Tracer

    holder: dict = {}
    backends.make_chat_model = lambda cfg, **kw: holder["model"]
    home = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    cfg = load_config(environ={"SELFTUNE_HOME": str(home)})
    on = Agent(
        cfg, engine=object(), tracer=Tracer(TraceStore(home / "traces.db")), checkpoints=False
    )
    off = Agent(cfg, engine=object(), tracer=Tracer.disabled(), checkpoints=False)
    times: dict[str, list[float]] = {"tracing on": [], "tracing off": []}
    async with on, off:
        for i in range(episodes + 5):
            for label, agent in (("tracing on", on), ("tracing off", off)):
                holder["model"] = Scripted(
                    script=[call("calculator", expression=f"{i}*7"), AIMessage(str(i * 7))],
                    seen=[],
                    delay_s=latency_s,
                )
                t = time.perf_counter()
                res = await agent.run("compute", tools=["calculator"])
                dt = time.perf_counter() - t
                assert res.status == "ok" and res.answer == str(i * 7), res
                if i >= 5:  # warm-up episodes are not counted
                    times[label].append(dt)
    model_s = 2 * latency_s
    rows = {}
    for label, xs in times.items():
        med = statistics.median(xs)
        rows[label] = {
            "episodes": len(xs),
            "episode_ms_p50": med * 1000,
            "overhead_per_step_ms": (med - model_s) / 3 * 1000,
        }
    return {"model_latency_ms": latency_s * 1000, "steps_per_episode": 3, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=60)
    p.add_argument("--latency-ms", type=float, default=20.0)
    a = p.parse_args()
    result = asyncio.run(measure(a.episodes, a.latency_ms / 1000))
    table = Table(
        "mode",
        "episodes",
        "episode p50 ms",
        "overhead / step ms",
        title=f"agent, model fixed at {a.latency_ms:g} ms per call",
    )
    for label, r in result["rows"].items():
        table.add_row(
            label,
            str(r["episodes"]),
            f"{r['episode_ms_p50']:.1f}",
            f"{r['overhead_per_step_ms']:.2f}",
        )
    console = Console()
    console.print(table)
    trace_ms = (
        result["rows"]["tracing on"]["overhead_per_step_ms"]
        - result["rows"]["tracing off"]["overhead_per_step_ms"]
    )
    result["tracing_ms_per_step"] = trace_ms
    console.print(
        f"graph per step {result['rows']['tracing off']['overhead_per_step_ms']:.2f} ms, tracing adds {trace_ms:.2f} ms per step"
    )
    out = ROOT / "benchmarks" / "results" / "bench_agent.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
