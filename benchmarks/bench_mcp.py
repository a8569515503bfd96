"""MCP tool-call latency: a held session against a server started per call.

    .venv/bin/python -m benchmarks.bench_mcp [--calls 200] [--per-call 5]

Both sides call our own stdio server's calculator (`python -m tools.mcp_server`) in the same
run: through McpManager with the session held open, and by starting a server, initialising
a session, calling once and shutting down (what langchain-mcp-adapters does without a held
session). Prints a table and writes benchmarks/results/bench_mcp.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tools.mcp_client import McpManager
from tools.schemas import McpServerConfig

ROOT = Path(__file__).resolve().parents[1]
SERVER = McpServerConfig(
    name="st", command=sys.executable, args=["-m", "tools.mcp_server"], cwd=str(ROOT)
)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


async def held(calls: int) -> tuple[list[float], float]:
    t0 = time.perf_counter()
    async with McpManager([SERVER]) as m:
        start_s = time.perf_counter() - t0
        calc = {t.name: t for t in m.tools()}["st__calculator"]
        await calc.ainvoke({"expression": "1+1"})  # warm-up
        times = []
        for i in range(calls):
            t = time.perf_counter()
            assert await calc.ainvoke({"expression": f"{i} * 3"}) == str(i * 3)
            times.append(time.perf_counter() - t)
    return times, start_s


async def per_call(calls: int) -> list[float]:
    times = []
    for i in range(calls):
        t = time.perf_counter()
        async with McpManager([SERVER]) as m:
            calc = {t.name: t for t in m.tools()}["st__calculator"]
            assert await calc.ainvoke({"expression": f"{i} * 3"}) == str(i * 3)
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--per-call", type=int, default=5)
    a = p.parse_args()
    held_times, start_s = asyncio.run(held(a.calls))
    fresh_times = asyncio.run(per_call(a.per_call))
    ms = 1000.0
    rows = {
        "held session": {
            "calls": a.calls,
            "p50_ms": statistics.median(held_times) * ms,
            "p95_ms": pct(held_times, 0.95) * ms,
        },
        "server per call": {
            "calls": a.per_call,
            "p50_ms": statistics.median(fresh_times) * ms,
            "p95_ms": pct(fresh_times, 0.95) * ms,
        },
    }
    ratio = rows["server per call"]["p50_ms"] / rows["held session"]["p50_ms"]
    table = Table("mode", "calls", "p50 ms", "p95 ms", title="MCP calculator call, stdio")
    for mode, r in rows.items():
        table.add_row(mode, str(r["calls"]), f"{r['p50_ms']:.2f}", f"{r['p95_ms']:.2f}")
    console = Console()
    console.print(table)
    console.print(
        f"server start + initialise + list: {start_s * ms:.0f} ms; per-call/held p50: {ratio:.0f}x"
    )
    result = {"rows": rows, "server_start_ms": start_s * ms, "per_call_over_held_p50": ratio}
    out = ROOT / "benchmarks" / "results" / "bench_mcp.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
