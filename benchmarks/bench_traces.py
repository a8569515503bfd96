"""Trace store and tracer performance.

    .venv/bin/python -m benchmarks.bench_traces [--spans 100000] [--episodes 30]

Measures store write throughput (one process, four processes at once), query latency on a
store of `--spans` spans, and the tracing overhead on a realistic async episode (an LLM call
replaced by a 50 ms sleep plus two 5 ms tool calls), tracing on against off, interleaved.
Prints a table and writes benchmarks/results/bench_traces.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from traces.schemas import Grade, LlmData, Span, ToolData, Trace
from traces.store import TraceStore
from traces.tracer import Tracer

ROOT = Path(__file__).resolve().parents[1]
SPANS_PER_TRACE = 10


def _trace(i: int, t0: float) -> Trace:
    t = Trace(env=f"env{i % 5}", task_id=f"t{i % 200}", model="smollm2",
              adapter=None if i % 3 else f"v{i % 4}", start=t0 + i, end=t0 + i + 1,
              status="ok" if i % 4 else "error", answer=str(i), tags=[f"run:{i % 10}"])  # fmt: skip
    msgs = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": f"q{i}"}]
    for j in range(SPANS_PER_TRACE):
        if j % 3 == 0:
            s = Span(trace_id=t.id, kind="llm", name="chat", start=t.start, end=t.start + 0.1,
                     status="ok", llm=LlmData(messages=msgs, completion=f"answer {i} {j}",
                                              input_tokens=40, output_tokens=10))  # fmt: skip
        else:
            s = Span(trace_id=t.id, kind="tool", name="calculator", start=t.start, end=t.start + 0.01,
                     status="ok", tool=ToolData(name="calculator", arguments={"e": "1+1"}, result="2"))  # fmt: skip
        t.spans.append(s)
    return t


def bench_store_write(path: Path, n_traces: int) -> float:
    """spans/s through TraceStore.write in batches of 50 traces."""
    t0 = time.time() - 10 * 86400
    traces = [_trace(i, t0) for i in range(n_traces)]
    store = TraceStore(path)
    start = time.perf_counter()
    for k in range(0, n_traces, 50):
        chunk = traces[k : k + 50]
        store.write(chunk, [s for t in chunk for s in t.spans])
    wall = time.perf_counter() - start
    store.close()
    return n_traces * SPANS_PER_TRACE / wall


_RECORDER = r"""
import sys, time
from traces.store import TraceStore
from traces.tracer import Tracer
from traces.schemas import LlmData, ToolData
tracer = Tracer(TraceStore(sys.argv[1]))
msgs = [{"role": "user", "content": "q"}]
start = time.perf_counter()
for i in range(int(sys.argv[2])):
    with tracer.trace(env=sys.argv[3], task_id=str(i)) as t:
        for j in range(10):
            if j % 3 == 0:
                with tracer.span("llm", "chat", llm=LlmData(messages=msgs)) as s:
                    s.llm.completion = "x"
            else:
                with tracer.span("tool", "calc", tool=ToolData(name="calc")) as s:
                    s.tool.result = "2"
tracer.close()
print(time.perf_counter() - start)
"""


def bench_tracer_procs(path: Path, n_procs: int, n_traces: int) -> float:
    """spans/s recorded through Tracer by `n_procs` processes at once (10 spans per trace),
    timed inside the children (Python start-up and imports excluded)."""
    TraceStore(path).close()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RECORDER, str(path), str(n_traces), f"p{i}"],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(n_procs)
    ]
    walls = []
    for p in procs:
        out, _ = p.communicate()
        assert p.returncode == 0
        walls.append(float(out.strip()))
    wall = max(walls)
    with TraceStore(path) as s:
        assert s.count(limit=None) == n_procs * n_traces
    return n_procs * n_traces * SPANS_PER_TRACE / wall


def _pcts(xs: list[float]) -> tuple[float, float]:
    xs = sorted(xs)
    return xs[len(xs) // 2], xs[min(len(xs) - 1, int(len(xs) * 0.95))]


def bench_queries(path: Path, n_spans: int, reps: int = 40) -> dict[str, tuple[float, float]]:
    n_traces = n_spans // SPANS_PER_TRACE
    t0 = time.time() - 10 * 86400
    store = TraceStore(path)
    for k in range(0, n_traces, 500):
        chunk = [_trace(i, t0) for i in range(k, min(n_traces, k + 500))]
        store.write(chunk, [s for t in chunk for s in t.spans])
    ids = [t.id for t in store.query(limit=2000)]
    grades = [Grade(trace_id=tid, value=(i % 10) / 10, source="verifier", grader="numeric")
              for i, tid in enumerate(ids)]  # fmt: skip
    for g in grades:
        store.add_grade(g)
    queries = {
        "newest 50": lambda i: store.query(limit=50),
        "env + status, 50": lambda i: store.query(env="env2", status="ok", limit=50),
        "tag, 50": lambda i: store.query(tag="run:3", limit=50),
        "grade >= 0.8, 50": lambda i: store.query(min_grade=0.8, grader="numeric", limit=50),
        "time range, 50": lambda i: store.query(since=t0 + 1000, until=t0 + 2000, limit=50),
        "get with spans": lambda i: store.get(ids[i % len(ids)]),
        "stats": lambda i: store.stats(),
    }
    out = {}
    for name, fn in queries.items():
        times = []
        for i in range(reps):
            s = time.perf_counter()
            fn(i)
            times.append((time.perf_counter() - s) * 1000)
        out[name] = _pcts(times)
    store.close()
    return out


async def _episode(tracer: Tracer, i: int) -> float:
    start = time.perf_counter()
    async with tracer.trace(env="calc", task_id=str(i), model="smollm2") as t:
        msgs = [{"role": "user", "content": f"what is {i}+1?"}]
        with tracer.span("llm", "chat", llm=LlmData(messages=msgs)) as s:
            await asyncio.sleep(0.05)  # the model
            s.llm.completion = "calculator"
        for _ in range(2):
            with tracer.span("tool", "calculator", tool=ToolData(name="calculator")) as s:
                await asyncio.sleep(0.005)
                s.tool.result = str(i + 1)
        t.answer = str(i + 1)
    return time.perf_counter() - start


async def _bench_overhead(path: Path, rounds: int, concurrency: int) -> dict[str, float]:
    on, off = Tracer(TraceStore(path)), Tracer.disabled()
    times: dict[str, list[float]] = {"on": [], "off": []}
    for r in range(rounds):  # interleaved, alternating which goes first
        order = [("on", on), ("off", off)] if r % 2 == 0 else [("off", off), ("on", on)]
        for name, tracer in order:
            times[name] += await asyncio.gather(*(_episode(tracer, i) for i in range(concurrency)))
    on.close()
    med_on, med_off = statistics.median(times["on"]), statistics.median(times["off"])
    mean_on, mean_off = statistics.fmean(times["on"]), statistics.fmean(times["off"])
    return {
        "episodes_each": len(times["on"]),
        "median_on_ms": med_on * 1000,
        "median_off_ms": med_off * 1000,
        "median_overhead_pct": (med_on / med_off - 1) * 100,
        "mean_overhead_pct": (mean_on / mean_off - 1) * 100,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spans", type=int, default=100_000, help="spans in the query store")
    ap.add_argument("--episodes", type=int, default=30, help="overhead rounds (x8 concurrent)")
    ap.add_argument("--procs-traces", type=int, default=300, help="traces per process")
    args = ap.parse_args()
    con = Console()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        con.print("store write, one process ...")
        store_w = bench_store_write(tmp / "w.db", 5000)
        con.print("tracer, one process and four processes ...")
        tracer_1 = bench_tracer_procs(tmp / "p1.db", 1, args.procs_traces)
        tracer_4 = bench_tracer_procs(tmp / "p4.db", 4, args.procs_traces)
        con.print(f"queries on a {args.spans}-span store ...")
        q = bench_queries(tmp / "q.db", args.spans)
        con.print("tracing overhead ...")
        ov = asyncio.run(_bench_overhead(tmp / "o.db", args.episodes, 8))

    table = Table(title="traces benchmark")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("TraceStore.write, 1 process (batches of 500 spans)", f"{store_w:,.0f} spans/s")
    table.add_row(
        "Tracer, 1 process (10 spans/trace, commit per trace)", f"{tracer_1:,.0f} spans/s"
    )
    table.add_row("Tracer, 4 processes at once (total)", f"{tracer_4:,.0f} spans/s")
    for name, (p50, p95) in q.items():
        table.add_row(f"query: {name}", f"p50 {p50:.2f} ms  p95 {p95:.2f} ms")
    table.add_row(
        f"episode wall time, tracing off / on ({ov['episodes_each']} each)",
        f"{ov['median_off_ms']:.2f} / {ov['median_on_ms']:.2f} ms",
    )
    table.add_row("tracing overhead (median; mean)",
                  f"{ov['median_overhead_pct']:+.2f} %; {ov['mean_overhead_pct']:+.2f} %")  # fmt: skip
    con.print(table)
    result = {
        "store_write_spans_per_s": store_w,
        "tracer_1proc_spans_per_s": tracer_1,
        "tracer_4proc_spans_per_s": tracer_4,
        "query_store_spans": args.spans,
        "queries_ms": {k: {"p50": v[0], "p95": v[1]} for k, v in q.items()},
        "overhead": ov,
        "goals": {"spans_per_s_1proc": 5000, "overhead_pct_max": 2.0},
        "cpu_count": os.cpu_count(),
    }
    out = ROOT / "benchmarks" / "results" / "bench_traces.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    con.print(f"wrote {out}")


if __name__ == "__main__":
    main()
