"""`selftune improve --routes per-env` end to end on the real SmolLM2 with tiny limits: two
environments (calculator and a user folder of plain questions), each with a cycle chain on its
own route. Each environment's candidate is tuned from what answers its route (here the global
active adapter, the fallback), trained on its own environment's rows only, gated on its own
environment against that adapter with the probe as the guard, and, if promoted, becomes the
active adapter of its route while the global pointer stays where it was. It asserts the
mechanism, not a lucky score.

Its cost is about 110 single- and two-turn episodes and two 3-step trainings. On the shared
2-core machine under a benchmark (load 5-8) a run had not finished calculator's collection
after 25 minutes and was stopped, hence the generous timeouts; it has not yet passed on an
idle machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _tuner_fixtures import real_adapter

from tuner.improve import STEPS, JobState
from tuner.registry import Registry

ROOT = Path(__file__).resolve().parent.parent
GENERAL = ROOT / "agent" / "envs" / "general" / "tasks.jsonl"


def trivia_env(root: Path) -> Path:
    """A user environment folder named `trivia`: 16 of the general probe's train questions (no
    tools, `contains`/`numeric` graders), 10 as its train split and 6 as its test split; the
    probe plays its own test split, so the two never share a question."""
    folder = root / "trivia"
    folder.mkdir()
    rows = [json.loads(line) for line in GENERAL.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["split"] == "train"][:16]
    for i, r in enumerate(rows):
        r["id"] = f"trivia-{i:02d}"
        r["split"] = "train" if i < 10 else "test"
    (folder / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "environment.py").write_text(
        'NAME = "trivia"\n'
        'SYSTEM_PROMPT = "You are a helpful assistant. Answer the question briefly."\n'
        "TOOL_NAMES: list[str] = []\n"
    )
    return folder


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_per_env_improve_gates_and_promotes_each_environment_on_its_own_route(
    cfg, cli_env, tmp_path
):
    from agent.model.files import model_dir

    trivia = trivia_env(tmp_path)
    reg = Registry(cfg.workspace.adapters)
    # a global active adapter (a fresh LoRA: it answers like the base model): what every
    # route without an adapter of its own is answered by, so both chains start from it
    folder = real_adapter(tmp_path / "global", model_dir(cfg))
    reg.register(folder, base_model="smollm2-135m-instruct")
    reg.promote("v1", force=True)
    env = dict(
        cli_env,
        SELFTUNE_IMPROVE__MIN_NEW_TRACES="1",
        SELFTUNE_IMPROVE__MAX_TOKENS="32",
        SELFTUNE_AGENT__MAX_STEPS="3",  # a call, its result, the answer: loops end sooner
        SELFTUNE_IMPROVE__REPLAY="[]",  # replay's rows per route: tests/test_gate_routes.py
        SELFTUNE_TUNER__GATE__ROBUSTNESS="[]",
    )
    args = [sys.executable, "-m", "agent.cli", "improve", "calculator", str(trivia),
            "--routes", "per-env", "--collect-limit", "8", "--eval-limit", "6",
            "--max-train-steps", "3", "--concurrency", "8"]  # fmt: skip
    done = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=3300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]

    state = JobState.load(sorted(cfg.workspace.jobs.glob("improve-*/state.json"))[-1])
    assert state.finished is not None and state.settings["routes"] == "per-env"
    # one chain per environment, each on the route named for it (the folder's NAME, not its path)
    assert [(c.index, c.route) for c in state.cycles] == [(1, "calculator"), (1, "trivia")]
    reg = Registry(cfg.workspace.adapters)
    given = {"calculator": "calculator", "trivia": str(trivia)}
    for cycle in state.cycles:
        route = cycle.route
        assert cycle.done == list(STEPS), (route, cycle.skipped)
        assert set(cycle.collect) == {given[route]}
        # its dataset holds its own environment's rows only
        manifest = json.loads(Path(cycle.dataset["manifest"]).read_text())
        assert set(manifest["counts"]["by_env"]) == {route}
        assert f"cycle1-{route}-sft" in cycle.dataset["dir"]
        # tuned from what answered the route: the global active, as the route had none
        rec = reg.get(cycle.candidate)
        assert rec.parent == "v1" and rec.metrics["global_step"] == 3
        # gated for its route, on its environment, against that same adapter, probe-guarded
        gate = rec.eval_results[-1]
        assert gate["route"] == route and gate["gate"]["route"] == route
        assert gate["active_version"] == "v1" and gate["envs"] == [given[route]]
        assert gate["guard_envs"] == {"general": "probe"}
        assert [r["env"] for r in gate["candidate"]] == [route, "general"]
        assert all(r["n"] == 6 and r["split"] == "test" for r in gate["candidate"])
        assert cycle.gate["route"] == route and set(cycle.evals[cycle.candidate]) == {route}
        # promoted: the route's active adapter; rejected: the route has none
        promoted = gate["gate"]["promote"]
        assert reg.routes().get(route) == (cycle.candidate if promoted else None)
        assert rec.status == ("candidate" if promoted else "rejected")  # statuses: the global
        verdict = f"promoted on route {route}" if promoted else "rejected on route"
        assert f"candidate {cycle.candidate}: {verdict}" in done.stdout
    # the global pointer never moved
    assert reg.active().version == "v1"
    print(
        {
            c.route: (c.candidate, c.gate["promote"], c.wall_s and round(c.wall_s))
            for c in state.cycles
        }
    )


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_per_env_grpo_runs_one_online_run_per_route_from_that_routes_adapter(
    cfg, cli_env, tmp_path
):
    """`--method grpo --routes per-env`: each environment's cycle is a GRPO run of its own
    (rolled out on that environment only, started from what answers the route), and its
    candidate is gated and promoted on that route. A run whose groups all agreed stops on the
    sanity check instead, and the cycle says so: both outcomes are asserted for what they are."""
    from agent.model.files import model_dir

    trivia = trivia_env(tmp_path)
    reg = Registry(cfg.workspace.adapters)
    reg.register(
        real_adapter(tmp_path / "global", model_dir(cfg)), base_model="smollm2-135m-instruct"
    )
    reg.promote("v1", force=True)
    env = dict(
        cli_env,
        SELFTUNE_IMPROVE__MAX_TOKENS="32",
        SELFTUNE_AGENT__MAX_STEPS="3",
        SELFTUNE_IMPROVE__REPLAY="[]",
        SELFTUNE_TUNER__GATE__ROBUSTNESS="[]",
        SELFTUNE_TUNER__GRPO__GROUP_SIZE="4",
        SELFTUNE_TUNER__GRPO__TASKS_PER_STEP="3",
        SELFTUNE_TUNER__GRPO__MAX_ROUNDS="2",
    )
    args = [sys.executable, "-m", "agent.cli", "improve", "calculator", str(trivia),
            "--routes", "per-env", "--method", "grpo", "--eval-limit", "6",
            "--max-train-steps", "1", "--concurrency", "8"]  # fmt: skip
    done = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=3300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]

    state = JobState.load(sorted(cfg.workspace.jobs.glob("improve-*/state.json"))[-1])
    assert [(c.index, c.route) for c in state.cycles] == [(1, "calculator"), (1, "trivia")]
    given = {"calculator": "calculator", "trivia": str(trivia)}
    runs = {}
    for path in cfg.workspace.jobs.glob("grpo-*/state.json"):
        run = json.loads(path.read_text())
        runs[run["id"]] = run
    assert len(runs) == 2  # one run per route: the second did not resume the first
    reg = Registry(cfg.workspace.adapters)
    for cycle in state.cycles:
        run = runs[cycle.train_metrics["grpo_run"]]
        # rolled out on the route's environment only, from the adapter that answered the route
        assert run["env"] == given[cycle.route] and run["start_from"] == "v1"
        if cycle.skipped:
            assert "sanity check failed" in cycle.skipped and cycle.candidate is None
            continue
        assert cycle.done == list(STEPS) and run["finished"] and run["step"] == 1
        rec = reg.get(cycle.candidate)
        assert rec.parent == "v1" and rec.train_config["method"] == "grpo"
        gate = rec.eval_results[-1]
        assert gate["route"] == cycle.route and gate["envs"] == [given[cycle.route]]
        promoted = gate["gate"]["promote"]
        assert reg.routes().get(cycle.route) == (cycle.candidate if promoted else None)
    assert any(not c.skipped for c in state.cycles), [c.skipped for c in state.cycles]
    assert reg.active().version == "v1"
