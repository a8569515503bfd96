"""Run every benchmark, one after another (each in its own process, so none pays for another's
imports or memory): `.venv/bin/python -m benchmarks`. Tables on stdout, JSON in benchmarks/results/."""

import subprocess
import sys

BENCHES = [
    "bench_traces",
    "bench_tracing",
    "bench_agent",
    "bench_mcp",
    "bench_retrieval",
    "bench_backend",
    "bench_prefix",
    "bench_eval",
    "bench_tuner",
    "bench_vllm",
    "bench_grpo",
    "bench_cycle",  # a whole calculator cycle from scratch: minutes
]

failed = [
    b for b in BENCHES if subprocess.run([sys.executable, "-m", f"benchmarks.{b}"]).returncode != 0
]
if failed:
    sys.exit(f"benchmarks that failed: {', '.join(failed)}")
