"""Learning from traffic: a scripted user session, then one `improve --source traffic` cycle.

    .venv/bin/python -m benchmarks.bench_traffic [--questions 200] [--env calculator]
        [--model agent|raw] [--eval-limit 54] [--max-train-steps -1] [--correct-share 0.5]

The scripted user: the first `--questions` tasks of the environment's train split, asked
through the official `openai` client of a real `selftune serve` app (uvicorn in a thread, the
real model), `--per-session` (4) questions per session (`user=`), one after another, with
`--concurrency` (8) sessions at once. Each answer is compared
with the task's reference by the environment's rule grader; a right one gets a thumb up over `POST /v1/feedback`, a
wrong one a thumb down, and `--correct-share` of the wrong ones a correction (the reference).
Every 10th session is marked private (`X-Selftune-Private: 1`) and must stay out.

Then one traffic cycle (tuner.improve with source "traffic") in a fresh workspace: it selects,
grades and splits the traffic (20 % of sessions held out), trains from the rest, and gates on
the environment's held-out test split plus the held-out traffic. Reported: zero-shot success on
the test split before (base) and after (the candidate), each with its 95 % Wilson interval; the
held-out traffic slice for both models; rows per feedback kind; the wall time of each phase.
Prints a table and writes benchmarks/results/bench_traffic.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
SESSION_FILE = "bench_traffic_session.json"  # a run's session counts, for --session-from
sys.path.insert(0, str(ROOT / "tests"))


def scripted_session(cfg, model_path: Path, args) -> dict:
    """Ask, compare with the reference, give feedback; returns the counts."""
    import httpx
    import openai
    from _serve_fixtures import app_server

    from agent.agent import Agent
    from agent.envs import load_environment
    from agent.model import LocalEngine
    from agent.serving.agent_service import AGENT_MODEL, AgentService
    from agent.serving.openai_server import build_app
    from agent.workspace import trace_db_path
    from traces import graders
    from traces.store import TraceStore
    from traces.tracer import Tracer

    environment = load_environment(args.env, config=cfg.agent)
    tasks = environment.split("train")[: args.questions]
    engine = LocalEngine(model_path, threads=cfg.model.threads, batch_wait_ms=20)
    tracer = Tracer(TraceStore(trace_db_path(cfg)))
    store = TraceStore(trace_db_path(cfg))
    service = AgentService(Agent(cfg, engine=engine, tracer=tracer))
    counts = {"asked": 0, "right": 0, "up": 0, "down": 0, "correction": 0, "private": 0}
    model = AGENT_MODEL if args.model == "agent" else cfg.model.name
    try:
        with app_server(build_app(engine, agent=service, tracer=tracer, store=store)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            lock = threading.Lock()  # counts and the correction share are shared by sessions
            wrong = 0

            def ask(i: int, task) -> None:
                nonlocal wrong
                session = f"user-{i // args.per_session}"
                private = (i // args.per_session) % 10 == 9
                completion = client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": task.prompt}],
                    max_tokens=args.max_tokens,
                    user=session,
                    extra_headers={"X-Selftune-Private": "1"} if private else {},
                )
                answer = completion.choices[0].message.content or ""
                # the reference comparison a person would make: the task's rule grader
                grade = graders.rule(task.grader or environment.grader) or graders.grade_numeric
                right = grade(answer, task.answer, task.metadata).score >= 1.0
                body: dict = {"id": completion.id, "thumb": "up" if right else "down"}
                with lock:
                    counts["asked"] += 1
                    counts["right"] += right
                    counts["private"] += private
                    counts["up" if right else "down"] += 1
                    if not right:
                        wrong += 1
                        if (
                            task.answer is not None
                            and counts["correction"] < args.correct_share * wrong
                        ):
                            body["correction"] = str(task.answer)
                            counts["correction"] += 1
                r = httpx.post(f"{url}/v1/feedback", json={**body, "user": "scripted"})
                r.raise_for_status()

            def session(first: int) -> None:  # a person asks one question after another
                for i in range(first, min(first + args.per_session, len(tasks))):
                    ask(i, tasks[i])

            # `--concurrency` people at once, as a deployed agent sees them: their requests
            # meet in the engine's batches
            with ThreadPoolExecutor(args.concurrency) as pool:
                for f in [pool.submit(session, s) for s in range(0, len(tasks), args.per_session)]:
                    f.result()
    finally:
        tracer.close()
        store.close()
        engine.close()
    return counts


def run(args) -> dict:
    from _serve_fixtures import workspace

    from agent.config import load_config
    from agent.workspace import trace_db_path
    from tuner.improve import improve

    home = Path(args.home or tempfile.mkdtemp(prefix="bench-traffic-"))
    from _runtime_fixtures import require_model

    model_path = require_model()
    workspace(home, model_path)  # links the model in
    overrides = {**os.environ, "SELFTUNE_HOME": str(home)}  # SELFTUNE_* settings apply
    if not args.guards:
        overrides |= {"SELFTUNE_TUNER__GATE__PROBE": "", "SELFTUNE_TUNER__GATE__ROBUSTNESS": "[]"}
    cfg = load_config(environ=overrides)
    cfg.workspace.ensure()
    t0 = time.perf_counter()
    if args.session_from:  # the same recorded traffic, another cycle (a side-by-side variant)
        earlier = Path(args.session_from)
        shutil.copyfile(earlier / "traces.db", trace_db_path(cfg))
        recorded = json.loads((earlier / SESSION_FILE).read_text())
        counts, session_s = recorded["counts"], recorded["session_s"]
    else:
        counts = scripted_session(cfg, model_path, args)
        session_s = time.perf_counter() - t0
        (home / SESSION_FILE).write_text(json.dumps({"counts": counts, "session_s": session_s}))
    settings = cfg.improve.updated(
        envs=[args.env],
        source="traffic",
        method=args.method,
        eval_limit=args.eval_limit,
        max_train_steps=args.max_train_steps,
        max_tokens=args.max_tokens,
        concurrency=args.concurrency,
        min_new_traces=1,
        traffic_replay=not args.no_replay,
    )
    t1 = time.perf_counter()
    state = asyncio.run(improve(cfg, settings, resume=False))
    cycle_s = time.perf_counter() - t1
    cycle = state.cycles[0]
    before = state.baseline["base"][args.env]
    after = cycle.evals.get(cycle.candidate or "", {}).get(args.env)
    return {
        "env": args.env,
        "model": args.model,
        "questions": args.questions,
        "session": counts,
        "traffic": {k: v for k, v in cycle.traffic.items() if k != "items"},
        "rows": cycle.dataset.get("rows"),
        "rows_by_signal": cycle.dataset.get("rows_by_signal", {}),
        "skipped": cycle.skipped,
        "candidate": cycle.candidate,
        "promoted": bool(cycle.gate.get("promote")),
        "test_before": {k: before[k] for k in ("n", "successes", "success_rate", "ci95")},
        "test_after": None
        if after is None
        else {k: after[k] for k in ("n", "successes", "success_rate", "ci95")},
        "heldout_traffic": cycle.traffic.get("gate"),
        "replay": cycle.traffic.get("replay"),
        "gate": {k: cycle.gate.get(k) for k in ("promote", "reasons", "blocked_by", "numbers")},
        "wall_s": {"session": session_s, "cycle": cycle_s, "total": session_s + cycle_s},
        "settings": {k: getattr(args, k) for k in vars(args)},
        "workspace": str(home),
    }


def table(result: dict) -> Table:
    t = Table(title=f"learning from traffic: {result['questions']} questions on {result['env']}")
    t.add_column("measure")
    t.add_column("value", justify="right")

    def rate(d):
        if not d:
            return "-"
        lo, hi = d.get("ci95") or d.get("candidate_ci95") or (0, 1)
        return f"{d['success_rate']:.1%} [{lo:.1%}, {hi:.1%}] (n={d['n']})"

    s = result["session"]
    t.add_row("answers right at serving time", f"{s['right']}/{s['asked']}")
    t.add_row("feedback: up / down / corrections", f"{s['up']} / {s['down']} / {s['correction']}")
    t.add_row("private questions (left out)", str(result["traffic"].get("excluded", {})))
    t.add_row("held-out traffic traces", str(result["traffic"].get("heldout_traces")))
    t.add_row("rows by signal", json.dumps(result["rows_by_signal"]))
    replay = result.get("replay") or {}
    if replay.get("questions"):
        t.add_row(
            "replayed: questions / right through the tools",
            f"{replay['questions']} / {replay.get('kept', 0)}",
        )
    t.add_row("test before (base)", rate(result["test_before"]))
    t.add_row("test after (candidate)", rate(result["test_after"]))
    h = result["heldout_traffic"]
    if h:
        t.add_row(
            "held-out traffic: active -> candidate",
            f"{h['active']:.1%} -> {h['candidate']:.1%} (n={h['n']})",
        )
    t.add_row("candidate", f"{result['candidate']} ({'promoted' if result['promoted'] else 'rejected'})"
              if result["candidate"] else f"none: {result['skipped']}")  # fmt: skip
    w = result["wall_s"]
    t.add_row("wall time: session / cycle", f"{w['session']:.0f} s / {w['cycle']:.0f} s")
    return t


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--questions", type=int, default=200)
    p.add_argument("--env", default="calculator")
    p.add_argument("--model", choices=("agent", "raw"), default="agent")
    p.add_argument("--method", choices=("sft", "dpo", "kto"), default="sft")
    p.add_argument("--eval-limit", type=int, default=54)
    p.add_argument("--max-train-steps", type=int, default=-1)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--per-session", type=int, default=4, help="questions per session")
    p.add_argument("--correct-share", type=float, default=0.5)
    p.add_argument("--guards", action="store_true", help="keep the probe and robustness guards")
    p.add_argument("--home", default=None, help="workspace (default: a new temporary folder)")
    p.add_argument(
        "--session-from",
        default=None,
        help="an earlier run's workspace: its recorded traffic and feedback, no new session",
    )
    p.add_argument(
        "--no-replay",
        action="store_true",
        help="train on corrections as they are ([improve] traffic_replay = false)",
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_traffic.json"))
    args = p.parse_args(argv)
    result = run(args)
    Console().print(table(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    Console().print(f"written: {out}", soft_wrap=True)
    return result


if __name__ == "__main__":
    main()
