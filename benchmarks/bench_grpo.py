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

    .venv/bin/python -m benchmarks.bench_grpo --sampling [--env calculator --from ADAPTER] [--eval 54]

Dynamic sampling: the same GRPO run twice on the local backend, "before" (tasks at random,
one rollout per step, every turn the episode's advantage) and "after" (`[tuner.grpo]`'s
defaults: the solve-rate picker, dynamic sampling, turn-level credit). For each: the share of
rolled-out groups whose rewards were all equal (with its 95 % Wilson interval), the share of
the update's groups without signal, rollouts per trained group, and seconds per step. The
default environment (made here, binary rewards, tasks of kinds the base model always, never or
sometimes gets right) shows the mechanism on the base model; `--env` and `--from` measure a
real environment from a trained adapter. `--eval N` then scores the start adapter and both
results on N held-out test tasks (greedy, as the gate plays them), each result paired with the
start (won, lost, exact McNemar p): whether the signal bought a lift. Writes
benchmarks/results/bench_grpo_sampling.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

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


# binary rewards ("contains"), kinds of tasks the base model gets right always, sometimes, never
MIXED = {
    "capital": [("What is the capital of France? One word.", "Paris"),
                ("What is the capital of Italy? One word.", "Rome"),
                ("What is the capital of Japan? One word.", "Tokyo"),
                ("What is the capital of Spain? One word.", "Madrid"),
                ("What is the capital of Germany? One word.", "Berlin"),
                ("What is the capital of England? One word.", "London")],
    "colour": [("What colour is a clear sky? One word.", "blue"),
               ("What colour is grass? One word.", "green"),
               ("What colour is snow? One word.", "white"),
               ("What colour is a ripe banana? One word.", "yellow"),
               ("What colour is coal? One word.", "black"),
               ("What colour is a ripe tomato? One word.", "red")],
    "add": [(f"What is {a} + {b}? Give the number.", str(a + b))
            for a, b in ((17, 26), (38, 45), (29, 54), (46, 37), (58, 25), (67, 16))],
    "multiply": [(f"What is {a} * {b}? Give the number.", str(a * b))
                 for a, b in ((347, 29), (518, 73), (264, 87), (739, 46), (185, 94), (623, 58))],
}  # fmt: skip
MIXED_PY = """
NAME = "mixed"
SYSTEM_PROMPT = "Answer briefly."
TOOL_NAMES = []
GRADER = "contains"
"""


def _mixed_env(root: Path) -> Path:
    env = root / "mixed"
    env.mkdir()
    (env / "environment.py").write_text(MIXED_PY)
    rows = [
        {
            "id": f"{kind}-{i}",
            "prompt": q,
            "answer": a,
            "split": "train",
            "metadata": {"kind": kind},
        }
        for kind, items in MIXED.items()
        for i, (q, a) in enumerate(items)
    ]
    (env / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return env


def measure_sampling(
    env: str, steps: int, group: int, tasks: int, start: str | None, eval_limit: int = 0
) -> dict:
    """The same run "before" (uniform tasks, one rollout, no turn credit) and "after"
    ([tuner.grpo] defaults); the figures of each. With `eval_limit`, the start adapter and each
    run's result also play that many held-out test tasks (greedy, the gate's settings), and
    each result is compared with the start, episode by episode (exact McNemar)."""
    from agent.config import load_config
    from agent.envs.run import wilson_interval
    from tuner.grpo import GrpoRun
    from tuner.schemas import GrpoConfig

    if env == "mixed":
        if eval_limit:
            raise SystemExit("--eval needs held-out tasks: give --env (e.g. calculator)")
        env = str(_mixed_env(Path(tempfile.mkdtemp(prefix="bench-grpo-env-"))))
    base = GrpoConfig(steps=steps, group_size=group, tasks_per_step=tasks, max_tokens=32)
    modes = {
        "before": base.model_copy(
            update={"task_picker": "uniform", "dynamic_sampling": False, "turn_credit": 1.0}
        ),
        "after": base,
    }
    out: dict = {"env": Path(env).name, "steps": steps, "group_size": group,
                 "tasks_per_step": tasks, "from": start}  # fmt: skip
    parent = None  # the start's held-out result, which each run's result is paired with
    for name, gc in modes.items():
        home = _home(None)
        if start:  # the adapter folder the run starts from, registered in the fresh registry
            from tuner.registry import Registry

            copy = home / "start-adapter"  # register() moves the folder it is given
            shutil.copytree(start, copy)
            Registry(home / "adapters").register(copy, base_model=MODEL.name)
        cfg = load_config(environ={"SELFTUNE_HOME": str(home)})
        run = GrpoRun(cfg, env, gc, start_from="v1" if start else None,
                      console=Console(stderr=True, quiet=True))  # fmt: skip
        rec = asyncio.run(run.run())
        log = run.state.log
        groups = sum(r["groups"] for r in log)
        skipped = sum(r["skipped_groups"] for r in log)
        trained = sum(r["trained_groups"] for r in log)
        batch = steps * tasks  # groups an update asks for
        step_s = [r["sync_s"] + r["rollout_s"] + r["grade_s"] + r["update_s"] for r in log]
        out[name] = {
            "groups": groups,
            "skipped": skipped,
            "skipped_share": skipped / groups,
            "skipped_ci95": wilson_interval(skipped, groups),
            "trained_groups": trained,
            "batch_without_signal": max(batch - trained, 0) / batch,
            "batch_ci95": wilson_interval(max(batch - trained, 0), batch),
            "rollouts_per_trained_group": groups / max(trained, 1),
            "success_rate": statistics.fmean(r["success_rate"] for r in log),
            "step_s": statistics.fmean(step_s),
            "wall_s": sum(step_s),
            "rounds": [r["rounds"] for r in log],
        }
        if eval_limit:
            if parent is None:
                out["start"], parent = _held_out(cfg, env, "v1" if start else None, eval_limit)
            out[name]["test"], _ = _held_out(cfg, env, rec.version, eval_limit, parent)
    out["device"] = _device()
    return out


def _held_out(cfg, env: str, adapter: str | None, limit: int, parent=None) -> tuple[dict, Any]:
    """`adapter` on `limit` test tasks as the gate plays them: its figures and its SuiteResult;
    with `parent` (a SuiteResult), the episodes won and lost against it and the McNemar p."""
    from tuner.gate import evaluate, paired_test

    res = asyncio.run(evaluate(cfg, env, adapter, cfg.improve, limit=limit, progress=False))
    out = {"adapter": adapter or "base", "n": res.n, "successes": res.successes,
           "success_rate": res.success_rate, "ci95": list(res.ci95)}  # fmt: skip
    if parent is not None:
        pt = paired_test(res, parent)
        out |= {"won": pt.won, "lost": pt.lost, "p_value": pt.p_value}
    return out, res


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
    p.add_argument("--sampling", action="store_true", help="before/after dynamic sampling")
    p.add_argument("--env", default="mixed", help="--sampling: an environment (default: made here)")
    p.add_argument("--from", dest="start", help="--sampling: an adapter folder to start from")
    p.add_argument("--eval", type=int, default=0, metavar="N",
                   help="--sampling: score the start and each result on N held-out test tasks")  # fmt: skip
    a = p.parse_args()
    if a.sampling:
        res = measure_sampling(a.env, a.steps, a.group_size, a.tasks, a.start, a.eval)
        _report_sampling(res)
        return
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


def _report_sampling(res: dict) -> None:
    console = Console(width=max(Console().width, 130))
    t = Table("run", "groups rolled out", "all-equal (skipped)", "95 % CI",
              "update groups without signal", "95 % CI", "rollouts / trained group",
              "success", "step s", "wall s",
              title=f"GRPO groups on {res['env']}, G={res['group_size']} x {res['tasks_per_step']} "
                    f"tasks, {res['steps']} steps, from {res['from'] or 'the base model'}, "
                    f"{res['device']}")  # fmt: skip
    for name in ("before", "after"):
        r = res[name]
        lo, hi = r["skipped_ci95"]
        blo, bhi = r["batch_ci95"]
        t.add_row(name, str(r["groups"]), f"{r['skipped']} ({r['skipped_share']:.0%})",
                  f"{lo:.0%}-{hi:.0%}", f"{r['batch_without_signal']:.0%}", f"{blo:.0%}-{bhi:.0%}",
                  f"{r['rollouts_per_trained_group']:.2f}", f"{r['success_rate']:.0%}",
                  f"{r['step_s']:.0f}", f"{r['wall_s']:.0f}")  # fmt: skip
    console.print(t)
    if "start" in res:
        t = Table("model", "held-out test", "95 % CI", "won / lost vs start", "McNemar p",
                  title=f"held-out test tasks of {res['env']}, greedy")  # fmt: skip
        for name, r in (
            ("start", res["start"]),
            *((n, res[n]["test"]) for n in ("before", "after")),
        ):
            lo, hi = r["ci95"]
            vs = f"{r['won']} / {r['lost']}" if "won" in r else "-"
            p = f"{r['p_value']:.3g}" if "p_value" in r else "-"
            t.add_row(f"{name} ({r['adapter']})", f"{r['successes']}/{r['n']} = {r['success_rate']:.1%}",
                      f"{lo:.1%}-{hi:.1%}", vs, p)  # fmt: skip
        console.print(t)
    path = ROOT / "benchmarks" / "results" / "bench_grpo_sampling.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2))
    console.print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
