"""Bootstrapping from reference answers alone: a user's environment with nothing but tasks and
a corpus (no demos, no hints, no environment.py) must yield grounded traces to train on, and
one whose answers no tool can reach must say so."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from _traces_fixtures import make_trace, task
from rich.console import Console

from agent.envs import load_environment
from agent.envs.bootstrap import (
    NOT_FROM_TOOLS,
    answer_prompt,
    answers_in_corpus,
    synthesise_demos,
    through_tools,
)
from benchmarks.envs.user_retrieval import make as user_env
from traces.flags import PASS_SCORE, reference_in
from traces.read import trace_tokens, training_conversation
from traces.schemas import TraceQuery

TOWN = "Dravik lies on the river Sorwela. It was founded in 1412 by Ilsa Mortvik."


def _river_task(**kw):
    return task("Which river flows through Dravik?", ["Sorwela"], tools=["search"], **kw)


# --- the filter: a rationalised answer counts only if it came through the tools ------------------


def test_a_rationalised_answer_the_search_returned_is_kept():
    trace = make_trace("Sorwela.", [("search", {"query": "Dravik river"}, TOWN)])
    assert through_tools(_river_task(), trace) is None


def test_a_rationalised_answer_without_a_tool_call_is_rejected():
    assert through_tools(_river_task(), make_trace("Sorwela.")) == (
        "no successful call of the task's tools"
    )
    failed = make_trace("Sorwela.", [("search", {"query": "Dravik river"}, None)])
    assert through_tools(_river_task(), failed) == "no successful call of the task's tools"


def test_a_rationalised_answer_the_tools_never_returned_is_rejected():
    miss = make_trace(
        "Sorwela.", [("search", {"query": "Dravik"}, "Stewick lies on the Draminna.")]
    )
    assert through_tools(_river_task(), miss) == "the reference is in no tool result"


def test_an_answer_copied_into_the_query_is_rejected():
    # the shown answer typed into the search finds the passage, but the model did not find it
    copied = make_trace("Sorwela.", [("search", {"query": "river Sorwela Dravik"}, TOWN)])
    assert through_tools(_river_task(), copied) == (
        "the reference was copied into a tool call's arguments"
    )


def test_other_tools_count_by_their_result():
    calc = task(tools=["calculator"])  # 1234 * 5678 = 7006652
    ok = make_trace("7,006,652", [("calculator", {"expression": "1234 * 5678"}, "7006652")])
    assert through_tools(calc, ok) is None
    copied = make_trace("7006652", [("calculator", {"expression": "7006652 + 0"}, "7006652")])
    assert through_tools(calc, copied) is not None
    other_tool = make_trace("7006652", [("python", {"code": "print(1234*5678)"}, "7006652")])
    assert through_tools(calc, other_tool) == "no successful call of the task's tools"


def test_the_plain_prompt_comes_back_in_the_training_row():
    t = _river_task()
    trace = make_trace(
        "Sorwela.",
        [("search", {"query": "Dravik river"}, TOWN)],
        metadata={"hinted": True, "conditioned": "answer", "task_prompt": t.prompt},
    )
    llm = next(s for s in trace.spans if s.kind == "llm")
    llm.llm.messages = [{"role": "user", "content": answer_prompt(t)}]
    assert "The answer is Sorwela" in answer_prompt(t)
    messages, _ = training_conversation(trace)
    users = [m["content"] for m in messages if m["role"] == "user"]
    assert users == [t.prompt]


def test_answers_in_corpus_counts_the_reachable_tasks(tmp_path):
    (tmp_path / "towns.md").write_text(TOWN)
    tasks = [_river_task(), task("Who founded Stewick?", ["Nila Osvik"], tools=["search"])]
    assert answers_in_corpus(tasks, tmp_path) == (1, 2)
    assert answers_in_corpus(tasks, None) == (0, 2)


# --- real Chroma, real model ------------------------------------------------------------------


def _user_env(root: Path, n_train: int, n_test: int, drop_sources: bool = False) -> Path:
    """A small copy of benchmarks/envs/user_retrieval: tasks.jsonl and corpus/ only."""
    user_env.write(root)
    rows = [json.loads(line) for line in (root / "tasks.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"][:n_train]
    test = [r for r in rows if r["split"] == "test"][:n_test]
    (root / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train + test))
    if drop_sources:  # the documents that hold the answers are missing
        for f in (root / "corpus").glob("*.md"):
            f.write_text("# Towns\n\nNothing is known about these towns yet.\n")
    assert {p.name for p in root.iterdir()} == {"tasks.jsonl", "corpus"}
    return root


def test_self_written_demos_come_from_really_calling_search(cfg, tmp_path):
    from agent.envs.run import env_tools

    env = load_environment(_user_env(tmp_path / "towns", 6, 0), config=cfg.agent)
    tools = env_tools(cfg, env)
    demos, counts = asyncio.run(synthesise_demos(env.split("train"), tools, 2))
    assert counts["kept"] == len(demos) == 2
    for demo in demos:
        call, result = demo["messages"][1], demo["messages"][2]
        t = env.task(demo["task_id"])
        assert call["tool_calls"][0]["function"]["arguments"]["query"] in t.prompt
        # the tool turn is what the real search returned for that query, and holds the answer
        real = asyncio.run(
            next(x for x in tools if x.name == "search").ainvoke(
                {"query": call["tool_calls"][0]["function"]["arguments"]["query"]}
            )
        )
        assert result["content"] == real and t.answer[0] in real


def test_answers_no_tool_can_reach_stop_the_cycle_with_the_reason(cfg, tmp_path):
    from tuner.improve import CycleState, ImproveJob

    root = _user_env(tmp_path / "lost", 6, 2, drop_sources=True)
    job = ImproveJob(cfg, cfg.improve.updated(envs=[str(root)]), Console(stderr=True))
    job.open(resume=False)
    cycle = CycleState(index=1)
    job.state.cycles.append(cycle)

    async def go():
        try:
            await job._collect(cycle)
        finally:
            if job._agent is not None:
                await job._agent.aclose()

    asyncio.run(go())
    stats = cycle.collect[str(root)]
    assert stats["n"] == 0 and stats["tasks_solved"] == 0  # nothing was played
    assert cycle.skipped.startswith("nothing learnable")
    assert "appears in the corpus" in cycle.skipped and "Add the documents" in cycle.skipped
    assert "collect more tasks" not in cycle.skipped


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_user_retrieval_env_yields_grounded_traces_and_a_dataset_with_plain_prompts(
    cfg, tmp_path
):
    from agent.agent import Agent
    from agent.envs import environment_tasks
    from agent.workspace import open_store
    from traces.datasets import DatasetFilters, build_dataset
    from tuner.improve import collect

    root = _user_env(tmp_path / "towns", 6, 0)
    # small: one demonstration, short turns (a tool call is ~30 tokens, an answer ~10)
    # the reference wave is off: this tests what the model's own waves reach
    settings = cfg.improve.updated(
        collect_limit=6, concurrency=6, few_shot=1, max_tokens=48, reference_wave=False
    )

    async def go():
        async with Agent(cfg, checkpoints=False) as agent:
            return await collect(
                cfg, str(root), settings, adapter=None, weak=True, seed=0, agent=agent,
                tags=["test"], console=Console(stderr=True),
            )  # fmt: skip

    stats = asyncio.run(go())
    kinds = [w["kind"] for w in stats["waves"]]
    assert kinds[0] == "demos" and "answer" in kinds  # no hints: rationalisation instead
    assert stats["self_demos"]["kept"] == settings.few_shot  # written by calling search
    assert stats["tasks_solved"] >= 1, stats

    store = open_store(cfg)
    out = tmp_path / "ds"
    res = build_dataset(
        store, "sft", out, DatasetFilters(min_score=1.0, best_of_n=True, exclude_flagged=True),
        tasks=environment_tasks(str(root), cfg)[1],
    )  # fmt: skip
    assert res.rows >= 1
    env = load_environment(root)
    for line in (out / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        user = next(m for m in row["messages"] if m["role"] == "user")["content"]
        assert "The answer is" not in user and user in {t.prompt for t in env.tasks}
        # grounded: the answer is in what search returned in that very conversation
        results = " ".join(m["content"] for m in row["messages"] if m["role"] == "tool")
        t = next(t for t in env.tasks if t.prompt == user)
        assert t.answer[0].lower() in results.lower()
    # every kept rationalised trace reached its answer through the tools
    for trace_id in res.manifest["trace_ids"]:
        flags = [f for g in store.grades(trace_id) for f in g.flags]
        assert NOT_FROM_TOOLS not in flags and "ungrounded" not in flags


def test_a_flagged_solved_trace_is_never_shown_as_a_demonstration(tmp_path):
    from agent.envs.run import _best_past_traces
    from traces.schemas import Grade
    from traces.store import TraceStore

    store = TraceStore(tmp_path / "traces.db")
    found = make_trace("Sorwela.", env="towns", task_id="a", metadata={"task_prompt": "river?"})
    copied = make_trace("Morsala.", env="towns", task_id="b", metadata={"task_prompt": "river?"})
    for t, flags in ((found, []), (copied, [NOT_FROM_TOOLS])):
        store.save(t)
        store.add_grade(
            Grade(trace_id=t.id, value=1.0, source="verifier", grader="contains", flags=flags)
        )
    shown = _best_past_traces(store, "towns", 2, exclude_task=None, prompt="river?")
    assert [t.task_id for t in shown] == ["a"]


def _play_reference(cfg, env, tasks):
    """The reference wave (tuner.improve._reference_wave) on `tasks` of `env`."""
    from tuner.improve import _reference_wave

    ids = {t.id for t in tasks}
    return asyncio.run(
        _reference_wave(
            cfg, env, ids, cfg.improve, seed=0, tags=["test"], console=Console(stderr=True)
        )  # fmt: skip
    )


def test_the_reference_policy_plays_failed_tasks_through_the_real_search(cfg, tmp_path):
    """The reference wave: real traces through the real search and grader; a task whose passage
    the search does not return is answered "not found" and fails, so it never reaches training."""
    from agent.envs import environment_tasks
    from agent.envs.bootstrap import NOT_FOUND, REFERENCE_POLICY
    from agent.workspace import open_store
    from traces.datasets import DatasetFilters, build_dataset

    root = _user_env(tmp_path / "towns", 6, 0)
    env = load_environment(root, config=cfg.agent)
    train = env.split("train")
    # one task whose answer the corpus no longer holds: the policy must not answer it
    lost = train[0]
    for f in (root / "corpus").glob("*.md"):
        f.write_text(f.read_text().replace(lost.answer[0], "(unknown)"))
    env = load_environment(root, config=cfg.agent)
    wave = _play_reference(cfg, env, train)
    assert wave["kind"] == "reference" and wave["n"] == 6
    assert lost.id not in wave["solved"] and len(wave["solved"]) == 5, wave

    store = open_store(cfg)
    traces = store.query(TraceQuery(tag=f"source:{REFERENCE_POLICY}", limit=None), with_spans=True)
    assert len(traces) == 6
    by_task = {t.task_id: t for t in traces}
    assert by_task[lost.id].answer == NOT_FOUND
    for trace in traces:  # the model's spans say who answered
        assert {s.llm.model for s in trace.spans if s.kind == "llm"} == {REFERENCE_POLICY}

    out = tmp_path / "ds"
    res = build_dataset(
        store, "sft", out, DatasetFilters(min_score=1.0, best_of_n=True, exclude_flagged=True),
        tasks=environment_tasks(str(root), cfg)[1],
    )  # fmt: skip
    assert res.rows == 5
    for line in (out / "train.jsonl").read_text().splitlines():
        msgs = [m for m in json.loads(line)["messages"] if m["role"] != "system"]
        assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "assistant"]
        t = next(t for t in train if t.prompt == msgs[0]["content"])
        query = msgs[1]["tool_calls"][0]["function"]["arguments"]
        query = json.loads(query) if isinstance(query, str) else query
        assert query["query"] in t.prompt  # the question, never the answer, is searched
        assert t.answer[0] in msgs[2]["content"] and t.answer[0] in msgs[3]["content"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_improve_on_a_user_retrieval_env_trains_on_grounded_rows_and_replay_and_gates(
    cfg, cli_env, tmp_path
):
    """`selftune improve PATH` with the defaults on a folder holding only tasks.jsonl and a
    corpus: the reference wave's grounded traces and the `general` replay rows make the
    dataset, an adapter is trained and gated with the probe guard, and the decision is
    recorded. It asserts the mechanism, not a score."""
    import subprocess
    import sys

    from agent.workspace import open_store
    from tuner.improve import JobState
    from tuner.registry import Registry

    root = _user_env(tmp_path / "towns", 16, 6)
    env = dict(
        cli_env,
        SELFTUNE_IMPROVE__MIN_NEW_TRACES="4",
        SELFTUNE_IMPROVE__MAX_TOKENS="32",
        SELFTUNE_TUNER__GATE__ROBUSTNESS="[]",  # tested in test_gate_guards
    )
    args = ["improve", str(root), "--collect-limit", "16", "--eval-limit", "6",
            "--max-train-steps", "3", "--concurrency", "8"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", *args], env=env, cwd=Path(__file__).parent.parent,
        capture_output=True, text=True, timeout=1700,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    home = cfg.workspace.root
    cyc = JobState.load(sorted(home.glob("jobs/improve-*/state.json"))[-1]).cycles[0]
    assert cyc.done == ["collect", "dataset", "tune", "gate", "reload"], cyc.skipped

    # the reference wave played the train tasks first, through the real search
    waves = cyc.collect[str(root)]["waves"]
    assert waves[0]["kind"] == "reference" and waves[0]["kept"] >= 4, waves
    # replay: the active (base) model played the general probe's 23 train tasks zero-shot,
    # greedily and three times sampled ([improve] replay_samples = 4)
    assert cyc.replay["general"]["n"] == 23 * 4
    manifest = json.loads(Path(cyc.dataset["manifest"]).read_text())
    by_env = manifest["counts"]["by_env"]
    assert by_env.get("general", 0) == cyc.dataset["replay_rows"]["general"] >= 1, by_env
    assert manifest["counts"]["by_source"].get("reference-policy", 0) >= 4, manifest["counts"]

    # only grounded rows: each towns row's answer is in what search returned in that row
    tasks = {t.prompt: t for t in load_environment(root).tasks}
    for line in (Path(cyc.dataset["dir"]) / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        user = next(m for m in row["messages"] if m["role"] == "user")["content"]
        if user in tasks:
            results = " ".join(m["content"] for m in row["messages"] if m["role"] == "tool")
            assert tasks[user].answer[0].lower() in results.lower()
        else:  # a replay row: a plain answer, no tool call
            assert not any(m.get("tool_calls") for m in row["messages"]), row
    store = open_store(cfg)
    for trace_id in manifest["trace_ids"]:
        assert not [f for g in store.grades(trace_id) for f in g.flags]
    # each replay row is its question's shortest right, unflagged answer of the four plays
    right: dict[str, list[int]] = {}
    for t in store.query(TraceQuery(tag="wave:replay", limit=None), with_spans=True):
        grades = store.grades(t.id)
        if grades and all(g.value >= PASS_SCORE and not g.flags for g in grades):
            right.setdefault(t.task_id, []).append(trace_tokens(t))
    general = [t for t in map(store.get, manifest["trace_ids"]) if t.env == "general"]
    assert general and len({t.task_id for t in general}) == len(general)
    assert all(trace_tokens(t) == min(right[t.task_id]) for t in general)
    assert any(len(v) > 1 for v in right.values()), "no question had two right answers to pick"

    # trained and gated, with the probe guard among what was judged; the decision is recorded
    rec = Registry(home / "adapters").get(cyc.candidate)
    assert rec.metrics["global_step"] == 3
    gate = rec.eval_results[-1]["gate"]
    assert "success_rate[general]" in gate["numbers"]
    assert gate["numbers"]["success_rate[general]"]["guard"] == "probe"
    assert rec.status == ("active" if gate["promote"] else "rejected")


def test_a_tasks_plan_is_played_through_the_real_subagent_and_calculator(cfg, tmp_path):
    """delegate's plans: the reference policy hands the lookup to the real researcher (which it
    also plays: a real search of the handbook) and computes with the real calculator. A plan
    whose looked-up fact the researcher cannot confirm stops there and is answered "not found",
    so it never reaches training; the others give an orchestrator row and a researcher row."""
    from agent.envs import environment_tasks
    from agent.envs.bootstrap import NOT_FOUND, plan_tasks, reference_playable
    from agent.workspace import open_store
    from traces.datasets import DatasetFilters, build_dataset

    env = load_environment("delegate", config=cfg.agent)
    train = env.split("train")[:4]
    assert all(reference_playable(t, env.tool_names) for t in train)
    # the researcher's question becomes a task of its own, its reference the plan's `expect`
    subs = {t.prompt: t.answer for t in plan_tasks(train)[4:]}
    assert subs == {t.plan[0].arguments["task"]: t.metadata["lookup_value"] for t in train}
    wrong = train[0]  # a fact the handbook does not hold: the plan must stop at the lookup
    wrong.plan[0].expect = 987654
    wave = _play_reference(cfg, env, train)
    assert wave["n"] == 4 and sorted(wave["solved"]) == sorted(t.id for t in train[1:]), wave

    store = open_store(cfg)
    traces = {t.task_id: t for t in store.query(TraceQuery(tag="wave:reference", limit=None))}
    assert traces[wrong.id].answer == NOT_FOUND
    out = tmp_path / "ds"
    res = build_dataset(
        store, "sft", out, DatasetFilters(min_score=1.0, best_of_n=True, exclude_flagged=True),
        tasks=environment_tasks("delegate", cfg)[1],
    )  # fmt: skip
    assert res.manifest["counts"]["by_agent"] == {"orchestrator": 3, "researcher": 3}
    for line in (out / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        msgs = [m for m in row["messages"] if m["role"] != "system"]
        calls = [c["function"] for m in msgs for c in m.get("tool_calls") or []]
        if row["subagent"] is None:  # the orchestrator: delegate, then compute, then answer
            t = next(t for t in train if t.prompt == msgs[0]["content"])
            assert [c["name"] for c in calls] == ["researcher", "calculator"]
            assert str(t.metadata["lookup_value"]) in msgs[2]["content"]  # the researcher's
            assert str(t.answer) in msgs[-1]["content"]
        else:  # the researcher: a real search whose passages hold the fact it reports
            assert row["subagent"] == "researcher" and [c["name"] for c in calls] == ["search"]
            reported = float(msgs[-1]["content"].rstrip("."))
            assert reference_in(reported, [msgs[2]["content"]])


def test_the_benchmarks_teacher_variants_add_the_teacher_to_what_they_compare_with():
    """bench_bootstrap's `teacher` is `full` plus a teacher, `teacher-only` the loop without
    its bootstrapping waves plus a teacher; without --teacher they stop, naming the flag."""
    from benchmarks.bench_bootstrap import VARIANTS, variant_environ

    assert variant_environ("teacher", "/a/v1") == {"SELFTUNE_TEACHER__ADAPTER": "/a/v1"}
    only = variant_environ("teacher-only", "/a/v1")
    assert only == dict(VARIANTS["no-bootstrap"], SELFTUNE_TEACHER__ADAPTER="/a/v1")
    assert variant_environ("no-replay", None) == {"SELFTUNE_IMPROVE__REPLAY": "[]"}
    with pytest.raises(SystemExit, match="--teacher"):
        variant_environ("teacher-only", None)
