"""Seconds per GRPO step (sync, rollout, grading, update) on three rollout engines, one run.

    .venv/bin/python -m benchmarks.bench_grpo [--steps 2] [--group-size 4] [--tasks 8]

G=4 episodes for each of 8 tasks per step, 64 new tokens per turn, temperature 1, on an
environment made here whose reward varies between samples (distinct words in the answer), so
every group carries signal and every step trains. The same run is done with rollouts

- `local`: in process (the local backend, the policy as a LoRA adapter);
- `vllm-lora`: on a vLLM server like `selftune serve --engine vllm` starts, the policy
  hot-loaded as a LoRA adapter after each update;
- `vllm-own` (rollout_engine = "vllm"): on a vLLM server the run starts for itself, without
  LoRA, the policy's merged weights reloaded in place after each update.

"sync" is the time to get the step's policy to the engine. Prints a table and writes
benchmarks/results/bench_grpo.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("local", "vllm-lora", "vllm-own")
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


def _home(venv_root: Path | None) -> Path:
    home = Path(tempfile.mkdtemp(prefix="bench-grpo-"))
    (home / "models").mkdir()
    (home / "models" / MODEL.name).symlink_to(MODEL)
    if venv_root is not None:
        (home / "engines").mkdir()
        (home / "engines" / venv_root.name).symlink_to(venv_root)
    return home


def _run(cfg, env: Path, gc) -> dict:
    from tuner.grpo import GrpoRun

    run = GrpoRun(cfg, str(env), gc, console=Console(stderr=True, quiet=True))
    asyncio.run(run.run())
    log = run.state.log
    keys = ("sync_s", "rollout_s", "grade_s", "update_s", "sequences", "trained_tokens",
            "reward_mean")  # fmt: skip
    out = {k: statistics.fmean(r[k] for r in log) for k in keys}
    out["step_s"] = out["sync_s"] + out["rollout_s"] + out["grade_s"] + out["update_s"]
    out["server_start_s"] = run.server_start_s
    return out


def measure(steps: int, group: int, tasks: int, engines: tuple[str, ...] = ENGINES) -> dict:
    from agent.config import load_config
    from agent.serving.vllm import VllmEnv, free_port, prepare
    from tuner.schemas import GrpoConfig

    venv = None
    if any(e != "local" for e in engines):
        venv = VllmEnv.for_config(load_config(environ={"SELFTUNE_HOME": str(ROOT / ".selftune")}))
        venv.ensure()
    gc = GrpoConfig(steps=steps, group_size=group, tasks_per_step=tasks, max_tokens=64)
    env = _env(Path(tempfile.mkdtemp(prefix="bench-grpo-env-")), tasks)
    out: dict = {"steps": steps, "group_size": group, "tasks_per_step": tasks}
    for name in engines:
        home = _home(venv.root if venv else None)  # a fresh registry and job folder per run
        cfg = load_config(environ={"SELFTUNE_HOME": str(home)})
        if name == "local":
            out[name] = _run(cfg, env, gc)
        elif name == "vllm-own":
            out[name] = _run(cfg, env, gc.model_copy(update={"rollout_engine": "vllm"}))
        else:  # a server like `selftune serve --engine vllm`, the policy hot-loaded as LoRA
            server = prepare(cfg, port=free_port(), install=False)
            server.start()
            try:
                server.wait_healthy()
                vcfg = load_config(
                    environ={
                        "SELFTUNE_HOME": str(home),
                        "SELFTUNE_MODEL__BACKEND": "openai",
                        "SELFTUNE_MODEL__BASE_URL": server.url,
                    }
                )
                out[name] = _run(vcfg, env, gc)
            finally:
                server.stop()
    if "local" in out:
        for name in engines:
            if name != "local":
                ratio = out[name]["rollout_s"] / out["local"]["rollout_s"]
                out[f"rollout_ratio_{name}_over_local"] = ratio
    out["device"] = _device()
    return out


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--engines", default=",".join(ENGINES), help="of " + ", ".join(ENGINES))
    a = p.parse_args()
    engines = tuple(a.engines.split(","))
    if not set(engines) <= set(ENGINES):
        p.error(f"--engines takes {', '.join(ENGINES)}")
    res = measure(a.steps, a.group_size, a.tasks, engines)
    console = Console(width=max(Console().width, 130))  # the table is wide
    t = Table("rollouts on", "step s", "sync s", "rollout s", "grade s", "update s",
              "sequences", "trained tokens", "reward mean", "engine start s",
              title=f"GRPO step, G={a.group_size} x {a.tasks} tasks, mean of {a.steps} steps, "
                    f"{res['device']}")  # fmt: skip
    for name in engines:
        r = res[name]
        start = "-" if r["server_start_s"] is None else f"{r['server_start_s']:.0f}"
        t.add_row(name, f"{r['step_s']:.1f}", f"{r['sync_s']:.1f}", f"{r['rollout_s']:.1f}",
                  f"{r['grade_s']:.3f}", f"{r['update_s']:.1f}", f"{r['sequences']:.0f}",
                  f"{r['trained_tokens']:.0f}", f"{r['reward_mean']:.3f}", start)  # fmt: skip
    console.print(t)
    for name in engines:
        if f"rollout_ratio_{name}_over_local" in res:
            ratio = res[f"rollout_ratio_{name}_over_local"]
            console.print(f"rollout time on {name} / local: {ratio:.2f} (goal ≤ 0.5)")
    path = ROOT / "benchmarks" / "results" / "bench_grpo.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2))
    console.print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
