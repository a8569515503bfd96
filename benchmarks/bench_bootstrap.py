"""Bootstrapping from reference answers alone: base vs after `selftune improve --fresh` cycles,
per environment and per variant (which bootstrapping mechanisms were on).

    .venv/bin/python -m benchmarks.bench_bootstrap \\
        [--envs benchmarks/envs/user_retrieval docs-qa] [--cycles 2] \\
        [--variants full no-rationalise no-self-demos] [--collect-limit 150] [--eval-limit 60]

Each (environment, variant) runs `python -m agent.cli improve ENV --cycles N --fresh` in a
workspace of its own (the converted model linked in), so every figure starts from scratch.
Variants switch the `[improve]` keys: `no-rationalise` (rationalise = false: no answer-shown
wave), `no-self-demos` (self_demos = false: no demonstrations written by calling the tools),
`no-reference` (reference_wave = false: no episodes played by the reference policy),
`no-bootstrap` (all three off: the loop as it was), `no-replay` (replay = []: no rows of the
`general` probe's train tasks beside the new ones). With `--teacher ADAPTER` (a trained adapter
folder, run in process on the student's base model as `[teacher] adapter`; each workspace is
fresh, so it holds no registry version to name),
`teacher` is `full` plus the teacher's wave (the train tasks the student's own waves failed),
and `teacher-only` is `no-bootstrap` plus that wave: how much a teacher adds over
self-collection, and what it buys alone. Success rates are zero-shot on the held-out test
split with the 95 % Wilson interval; a cycle's figure is its candidate's (promoted or not).
From the job's state it also reports each collection wave's kept episodes (right and unflagged:
what the dataset can use), which is each mechanism's share of the training data in one run.

Prints a table and writes benchmarks/results/bench_bootstrap.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "bench_bootstrap.json"
USER_ENV = "benchmarks/envs/user_retrieval"
VARIANTS = {
    "full": {},
    "no-rationalise": {"SELFTUNE_IMPROVE__RATIONALISE": "false"},
    "no-self-demos": {"SELFTUNE_IMPROVE__SELF_DEMOS": "false"},
    "no-reference": {"SELFTUNE_IMPROVE__REFERENCE_WAVE": "false"},
    "no-bootstrap": {
        "SELFTUNE_IMPROVE__RATIONALISE": "false",
        "SELFTUNE_IMPROVE__SELF_DEMOS": "false",
        "SELFTUNE_IMPROVE__REFERENCE_WAVE": "false",
    },
    "no-replay": {"SELFTUNE_IMPROVE__REPLAY": "[]"},
}
TEACHER_VARIANTS = {"teacher": "full", "teacher-only": "no-bootstrap"}  # -> the variant it adds to


def variant_environ(variant: str, teacher: str | None) -> dict[str, str]:
    """The `SELFTUNE_*` keys of `variant`; a teacher variant's need `teacher`."""
    if variant not in TEACHER_VARIANTS:
        return dict(VARIANTS[variant])
    if not teacher:
        raise SystemExit(f"variant {variant!r} needs --teacher ADAPTER (an adapter folder)")
    return dict(VARIANTS[TEACHER_VARIANTS[variant]], SELFTUNE_TEACHER__ADAPTER=teacher)


def _workspace(root: Path, model_dir: Path) -> Path:
    (root / "models").mkdir(parents=True, exist_ok=True)
    link = root / "models" / model_dir.name
    if not link.exists():
        link.symlink_to(model_dir, target_is_directory=True)
    return root


def _rate(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    if not summary:
        return None
    return {
        "success_rate": summary["success_rate"],
        "ci95": summary["ci95"],
        "n": summary["n"],
        "successes": summary["successes"],
        "wall_s": summary.get("wall_s"),
    }


def run_one(env: str, variant: str, args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    """One fresh improve job; its figures from the job's state.json."""
    home = _workspace(Path(args.work) / f"{Path(env).name}-{variant}", model_dir)
    environ = dict(os.environ, SELFTUNE_HOME=str(home), **variant_environ(variant, args.teacher))
    cmd = [
        sys.executable, "-m", "agent.cli", "improve", env, "--fresh",
        "--cycles", str(args.cycles), "--collect-limit", str(args.collect_limit),
        "--eval-limit", str(args.eval_limit), "--concurrency", str(args.concurrency),
    ]  # fmt: skip
    if args.max_train_steps:
        cmd += ["--max-train-steps", str(args.max_train_steps)]
    print(f"$ {' '.join(cmd)}  ({variant})", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=environ, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (home / "improve.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not sorted(home.glob("jobs/improve-*/state.json")):
        return {"env": env, "variant": variant, "error": (proc.stdout + proc.stderr)[-1500:]}
    return read_job(env, variant, home, wall)


def read_job(env: str, variant: str, home: Path, wall: float | None) -> dict[str, Any]:
    """The figures of the last improve job in workspace `home`; `wall` None: the job's own
    (start to finish, or its cycles' time when it was stopped)."""
    state = json.loads(sorted(home.glob("jobs/improve-*/state.json"))[-1].read_text())
    if wall is None:
        ended = state.get("finished")
        wall = (
            ended - state["started"]
            if ended
            else sum(c.get("wall_s") or 0 for c in state["cycles"])
        )
    name = next(iter(state["baseline"].get("base", {})), env)
    short = Path(name).name  # the gate's evals are keyed by the environment's own name
    cycles = []
    for c in state["cycles"]:
        cand = c.get("candidate")
        stats = c["collect"].get(env, {})
        cycles.append(
            {
                "index": c["index"],
                "candidate": cand,
                "promoted": bool(c.get("gate", {}).get("promote")),
                "eval": _rate(
                    c["evals"].get(cand, {}).get(name) or c["evals"].get(cand, {}).get(short)
                )
                if cand
                else None,
                "gate_reasons": c.get("gate", {}).get("reasons"),
                "skipped": c.get("skipped"),
                "wall_min": (c.get("wall_s") or 0) / 60,
                "waves": stats.get("waves", []),
                "self_demos": stats.get("self_demos"),
                "tasks_solved": stats.get("tasks_solved"),
                "dataset_rows": c.get("dataset", {}).get("rows"),
                "replay_rows": c.get("dataset", {}).get("replay_rows"),
                "probe": {  # the general-ability probe, active -> candidate
                    k: v
                    for k, v in c.get("gate", {}).get("numbers", {}).items()
                    if v.get("guard") == "probe" and k.startswith("success_rate")
                },
            }
        )
    return {
        "env": env,
        "variant": variant,
        "base": _rate(state["baseline"].get("base", {}).get(name)),
        "base_few_shot": _rate(state["baseline"].get("base few-shot", {}).get(name)),
        "cycles": cycles,
        "wall_min": wall / 60,
        "workspace": str(home),
    }


def _cell(r: dict[str, Any] | None) -> str:
    if not r:
        return "-"
    lo, hi = r["ci95"]
    return f"{r['success_rate']:.1%} [{lo:.0%}, {hi:.0%}]"


def table(results: list[dict[str, Any]], cycles: int) -> str:
    head = ["env", "variant", "base", "base few-shot"] + [
        f"after c{i}" for i in range(1, cycles + 1)
    ]
    head += ["min/cycle", "kept per wave (c1)", "probe (c1)"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['env']} | {r['variant']} | error: {r['error'][-200:]!r}")
            continue
        cells = [r["env"], r["variant"], _cell(r["base"]), _cell(r["base_few_shot"])]
        for i in range(cycles):
            c = r["cycles"][i] if i < len(r["cycles"]) else None
            if c is None:
                cells.append("-")
            elif c["eval"] is None:
                cells.append(f"skipped: {(c['skipped'] or '')[:60]}")
            else:
                cells.append(_cell(c["eval"]) + (" P" if c["promoted"] else " R"))
                if not c["promoted"] and c.get("gate_reasons"):
                    blocked = [x for x in c["gate_reasons"] if x.startswith("blocked")]
                    cells[-1] += f" ({blocked[0][:70]})" if blocked else ""
        mins = [c["wall_min"] for c in r["cycles"] if c["wall_min"]]
        cells.append(" / ".join(f"{m:.1f}" for m in mins) or "-")
        waves = r["cycles"][0]["waves"] if r["cycles"] else []
        cells.append(", ".join(f"{w['kind']} {w.get('kept', '?')}/{w['n']}" for w in waves) or "-")
        probe = r["cycles"][0].get("probe") if r["cycles"] else None
        cells.append(
            ", ".join(f"{v['active']:.0%} -> {v['candidate']:.0%}" for v in probe.values())
            if probe
            else "-"
        )
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--envs", nargs="+", default=[USER_ENV, "docs-qa"])
    parser.add_argument(
        "--variants", nargs="+", default=["full"], choices=sorted([*VARIANTS, *TEACHER_VARIANTS])
    )
    parser.add_argument(
        "--teacher", help="an adapter folder the teacher variants run as [teacher] adapter"
    )
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument("--collect-limit", type=int, default=150)
    parser.add_argument("--eval-limit", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-train-steps", type=int, default=0, help="0: [tuner.train]")
    parser.add_argument("--work", default="/tmp/bench_bootstrap", help="workspaces go here")
    parser.add_argument("--model-dir", default=str(ROOT / ".selftune/models/smollm2-135m-instruct"))
    parser.add_argument(
        "--report-only", action="store_true", help="read the workspaces under --work; run nothing"
    )
    args = parser.parse_args(argv)
    if args.teacher and Path(args.teacher).exists():
        args.teacher = str(Path(args.teacher).resolve())  # the job runs in another folder
    model_dir = Path(args.model_dir).resolve()
    if args.report_only:
        results = [
            read_job(e, v, Path(args.work) / f"{Path(e).name}-{v}", None)
            for e in args.envs
            for v in args.variants
        ]
    else:
        results = [run_one(e, v, args, model_dir) for e in args.envs for v in args.variants]
    report = {
        "settings": {k: v for k, v in vars(args).items()},
        "note": "success = zero-shot on the held-out test split; P/R: the gate promoted/rejected",
        "results": results,
    }
    print(table(results, args.cycles))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2))
    print(f"wrote {RESULTS}")
    return report


if __name__ == "__main__":
    main()
