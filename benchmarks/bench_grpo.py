"""Seconds per GRPO step (rollout, grading, update) on the local backend and on vLLM, one run.

    .venv/bin/python -m benchmarks.bench_grpo [--steps 2] [--group-size 4] [--tasks 8]

G=4 episodes for each of 8 tasks per step, 64 new tokens per turn, temperature 1, on an
environment made here whose reward varies between samples (distinct words in the answer), so
every group carries signal and every step trains. The same run is done with rollouts in
process and with rollouts on a vLLM server (policy weights pushed to it after each update).
Prints a table and writes benchmarks/results/bench_grpo.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / ".selftune/models/smollm2-135m-instruct"
PROMPTS = [
    "Describe the sea.", "Describe a forest.", "Describe a city at night.", "Describe winter.",
    "Describe a market.", "Describe a storm.", "Describe a library.", "Describe a desert.",
]  # fmt: skip
ENV_PY = """
NAME = "describe"
SYSTEM_PROMPT = "Answer in one or two sentences."
TOOL_NAMES = ["calculator"]


def grade(task, answer, trace):
    words = set(answer.lower().split())
    return min(1.0, len(words) / 80), f"{len(words)} distinct words"


GRADER = grade
"""


def _env(root: Path, n: int) -> Path:
    env = root / "describe"
    env.mkdir()
    (env / "environment.py").write_text(ENV_PY)
    rows = [{"id": f"d{i}", "prompt": p, "split": "train"} for i, p in enumerate(PROMPTS[:n])]
    (env / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return env


def _home(venv_root: Path) -> Path:
    home = Path(tempfile.mkdtemp(prefix="bench-grpo-"))
    (home / "models").mkdir()
    (home / "models" / MODEL.name).symlink_to(MODEL)
    (home / "engines").mkdir()
    (home / "engines" / venv_root.name).symlink_to(venv_root)
    return home


def _steps(cfg, env: Path, gc) -> list[dict]:
    from tuner.grpo import GrpoRun

    run = GrpoRun(cfg, str(env), gc, console=Console(stderr=True, quiet=True))
    asyncio.run(run.run())
    return run.state.log


def _summary(log: list[dict]) -> dict:
    keys = ("rollout_s", "grade_s", "update_s", "sequences", "trained_tokens", "reward_mean")
    out = {k: statistics.fmean(r[k] for r in log) for k in keys}
    out["step_s"] = out["rollout_s"] + out["grade_s"] + out["update_s"]
    return out


def measure(steps: int, group: int, tasks: int) -> dict:
    from agent.config import load_config
    from agent.vllm_server import VllmEnv, prepare
    from tuner.schemas import GrpoConfig

    venv = VllmEnv.for_config(load_config(environ={"SELFTUNE_HOME": str(ROOT / ".selftune")}))
    venv.ensure()
    gc = GrpoConfig(steps=steps, group_size=group, tasks_per_step=tasks, max_tokens=64)
    home = _home(venv.root)
    env = _env(home, tasks)
    out: dict = {"steps": steps, "group_size": group, "tasks_per_step": tasks}
    out["local"] = _summary(_steps(load_config(environ={"SELFTUNE_HOME": str(home)}), env, gc))

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home2 = _home(venv.root)  # a fresh registry and job folder for the vLLM run
    server = prepare(load_config(environ={"SELFTUNE_HOME": str(home2)}), port=port, install=False)
    server.start()
    try:
        server.wait_healthy()
        vcfg = load_config(
            environ={
                "SELFTUNE_HOME": str(home2),
                "SELFTUNE_MODEL__BACKEND": "openai",
                "SELFTUNE_MODEL__BASE_URL": server.url,
            }
        )
        out["vllm"] = _summary(_steps(vcfg, env, gc))
    finally:
        server.stop()
    out["rollout_ratio_vllm_over_local"] = out["vllm"]["rollout_s"] / out["local"]["rollout_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--tasks", type=int, default=8)
    a = p.parse_args()
    res = measure(a.steps, a.group_size, a.tasks)
    console = Console()
    t = Table("rollouts on", "step s", "rollout s", "grade s", "update s", "sequences",
              "trained tokens", "reward mean",
              title=f"GRPO step, G={a.group_size} x {a.tasks} tasks, mean of {a.steps} steps")  # fmt: skip
    for name in ("local", "vllm"):
        r = res[name]
        t.add_row(name, f"{r['step_s']:.1f}", f"{r['rollout_s']:.1f}", f"{r['grade_s']:.3f}",
                  f"{r['update_s']:.1f}", f"{r['sequences']:.0f}", f"{r['trained_tokens']:.0f}",
                  f"{r['reward_mean']:.3f}")  # fmt: skip
    console.print(t)
    console.print(
        f"rollout time on vLLM / local: {res['rollout_ratio_vllm_over_local']:.2f} (goal ≤ 0.5)"
    )
    path = ROOT / "benchmarks" / "results" / "bench_grpo.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2))
    console.print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
