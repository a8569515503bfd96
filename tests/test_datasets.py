"""Dataset builders: graded traces in a real TraceStore -> SFT/DPO/KTO/GRPO folders.

Traces are built here in the shape agent/agent.py writes them (root agent span, llm spans whose
`messages` are exactly what was sent, tool spans, subagent spans with a nested agent scope).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from _tuner_fixtures import CALCULATOR

from traces.datasets import (
    DatasetError,
    DatasetFilters,
    build_dataset,
    build_rows,
    split_at_divergence,
)
from traces.read import conversation_of, subagent_spans
from traces.schemas import Grade, LlmData, Span, Task, ToolCall, ToolData, Trace
from traces.store import TraceStore
from traces.times import TimeParseError, parse_duration, parse_time

SYSTEM = "You are a helpful assistant. Use the tools when they help."
RESEARCHER = {
    "type": "function",
    "function": {
        "name": "researcher",
        "description": "Ask the researcher subagent.",
        "parameters": {
            "type": "object",
            "properties": {"task": {"type": "string"}, "depth": {"type": "integer"}},
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the handbook.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
    },
}
DEMOS = [
    {"role": "user", "content": "What is 2 + 2?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "demo1",
                "type": "function",
                "function": {"name": "calculator", "arguments": {"expression": "2 + 2"}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "demo1", "name": "calculator", "content": "4"},
    {"role": "assistant", "content": "The answer is 4."},
]
_clock = itertools.count(1_000_000)
_ids = itertools.count(1)


def _t() -> float:
    return float(next(_clock))


class Episode:
    """Writes spans the way the agent does: one llm span per model call, each holding the
    full prompt sent (system, demos, conversation so far)."""

    def __init__(self, trace: Trace, system: str, demos: list[dict], tools: list[dict]):
        self.trace = trace
        self.root = self._span("agent", "orchestrator", None)
        self.scope = self.root.id
        self.sent_prefix = [{"role": "system", "content": system}, *demos]
        self.history: list[dict[str, Any]] = []
        self.tools = tools

    def _span(self, kind: str, name: str, parent: str | None, **kw: Any) -> Span:
        s = Span(
            trace_id=self.trace.id,
            parent_id=parent,
            kind=kind,
            name=name,
            start=_t(),
            status="ok",
            **kw,
        )
        s.end = s.start + 0.5
        self.trace.spans.append(s)
        return s

    def user(self, text: str) -> Episode:
        self.history.append({"role": "user", "content": text})
        return self

    def call(self, name: str, args: dict, result: str, kind: str = "tool", tokens: int = 10):
        cid = f"call_{next(_ids)}"
        completion = "<tool_call>" + json.dumps({"name": name, "arguments": args}) + "</tool_call>"
        self._llm(completion, [ToolCall(id=cid, name=name, arguments=args)], tokens)
        tool = self._span(
            kind,
            name,
            self.scope,
            tool=ToolData(name=name, call_id=cid, arguments=args, result=result),
        )
        self.history.append(
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}
                ],
            }
        )
        self.history.append({"role": "tool", "tool_call_id": cid, "name": name, "content": result})
        return tool

    def final(self, text: str, tokens: int = 5) -> Episode:
        self._llm(text, [], tokens)
        return self

    def _llm(self, completion: str, calls: list[ToolCall], tokens: int) -> None:
        sent = [*self.sent_prefix, *self.history]
        self._span(
            "llm",
            "chat smollm2",
            self.scope,
            llm=LlmData(
                messages=json.loads(json.dumps(sent)),
                tools=self.tools,
                completion=completion,
                tool_calls=calls,
                output_tokens=tokens,
            ),
        )

    def subagent(self, name: str, task: str, system: str, answer: str, inner: list[tuple]):
        """A subagent call: a subagent span under the orchestrator, and under it an agent
        span with the subagent's own llm/tool spans."""
        sub_span = self.call(name, {"task": task}, answer, kind="subagent")
        agent = self._span(
            "agent", name, sub_span.id, attributes={"subagent": name, "status": "ok"}
        )
        inner_ep = Episode.__new__(Episode)
        inner_ep.trace, inner_ep.root, inner_ep.scope = self.trace, agent, agent.id
        inner_ep.sent_prefix = [{"role": "system", "content": system}]
        inner_ep.history, inner_ep.tools = [], [SEARCH]
        inner_ep.user(task)
        for step in inner:
            inner_ep.call(*step)
        inner_ep.final(answer)
        return inner_ep


def episode(
    task_id: str | None,
    *,
    env: str = "calc",
    status: str = "ok",
    answer: str | None = None,
    demos: list[dict] | None = None,
    prompt: str = "What is 48 * 97?",
    tools: list[dict] | None = None,
    metadata: dict | None = None,
    trace_id: str | None = None,
) -> tuple[Trace, Episode]:
    demos = demos or []
    meta = {"demo_messages": len(demos), **(metadata or {})}
    t = Trace(env=env, task_id=task_id, status=status, answer=answer, metadata=meta, start=_t())
    if trace_id:
        t.id = trace_id
    ep = Episode(t, SYSTEM, demos, tools if tools is not None else [CALCULATOR])
    ep.user(prompt)
    return t, ep


def calc_episode(task_id: str, expr: str, result: str, final: str, **kw: Any) -> Trace:
    t, ep = episode(task_id, answer=final if kw.get("status", "ok") == "ok" else None, **kw)
    ep.call("calculator", {"expression": expr}, result)
    ep.final(final)
    return t


def grade(t: Trace, value: float, *, source: str = "verifier", grader: str = "numeric", **kw):
    return Grade(trace_id=t.id, value=value, source=source, grader=grader, created=_t(), **kw)


@pytest.fixture
def store(tmp_path: Path):
    s = TraceStore(tmp_path / "traces.db")
    yield s
    s.close()


def save(store: TraceStore, trace: Trace, *grades: Grade) -> Trace:
    store.save(trace)
    for g in grades:
        store.add_grade(g)
    return trace


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- reading conversations -------------------------------------------------------------------


def test_conversation_of_rebuilds_the_episode_from_the_last_llm_span():
    t = calc_episode("t1", "48 * 97", "4656", "48 * 97 = 4656")
    messages, tools = conversation_of(t)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant"]
    call = messages[2]["tool_calls"][0]["function"]
    assert call == {"name": "calculator", "arguments": {"expression": "48 * 97"}}
    assert messages[3]["content"] == "4656"
    assert messages[-1] == {"role": "assistant", "content": "48 * 97 = 4656"}
    assert tools == [CALCULATOR]


def test_final_assistant_turn_keeps_parsed_calls_and_strips_the_call_text():
    t, ep = episode("t1", status="max_steps")
    ep._llm(
        'Let me compute. <tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}}'
        "</tool_call>",
        [
            ToolCall(id="c9", name="calculator", arguments={"expression": "1+1"}),
            ToolCall(id="bad", name="calculator", raw_arguments="{oops", error="bad JSON"),
        ],
        7,
    )
    messages, _ = conversation_of(t)
    last = messages[-1]
    assert last["content"] == "Let me compute."
    assert [c["id"] for c in last["tool_calls"]] == ["c9"]  # the unparsable call is not taught


# --- SFT -------------------------------------------------------------------------------------


def test_sft_uses_only_traces_that_pass_every_filter(store: TraceStore):
    good = calc_episode("a", "48*97", "4656", "4656")
    wrong = calc_episode("b", "48*96", "4608", "4608")
    thumbs_down = calc_episode("c", "1+1", "2", "2")
    flagged = calc_episode("d", "2+2", "4", "4")
    stopped = calc_episode("e", "3+3", "6", "6", status="max_steps")
    ungraded = calc_episode("f", "4+4", "8", "8")
    other_env = calc_episode("g", "5+5", "10", "10", env="docs")
    test_split = calc_episode("h", "6+6", "12", "12")
    save(store, good, grade(good, 1.0))
    save(store, wrong, grade(wrong, 0.0))
    save(
        store,
        thumbs_down,
        grade(thumbs_down, 1.0),
        grade(thumbs_down, 0.0, source="human", grader="human:al"),
    )
    save(store, flagged, grade(flagged, 1.0, flags=["required_tool_not_called"]))
    save(store, stopped, grade(stopped, 1.0))
    save(store, ungraded)
    save(store, other_env, grade(other_env, 1.0))
    save(store, test_split, grade(test_split, 1.0))
    tasks = {("calc", "h"): Task(id="h", prompt="6+6", answer=12, split="test")}
    filters = DatasetFilters(env="calc", exclude_flagged=True)

    built = build_rows(
        "sft", store.query(limit=None, with_spans=True), _grades(store), filters, tasks
    )

    assert built.trace_ids == [good.id]
    assert built.excluded == {
        "below_min_score": 1,
        "flagged": 1,
        "human_thumbs_down": 1,
        "other_env": 1,
        "status_max_steps": 1,
        "test_split": 1,
        "ungraded": 1,
    }
    # without --exclude-flagged the flagged trace is used
    loose = build_rows(
        "sft",
        store.query(limit=None, with_spans=True),
        _grades(store),
        DatasetFilters(env="calc"),
        tasks,
    )
    assert set(loose.trace_ids) == {good.id, flagged.id}


def _grades(store: TraceStore) -> dict[str, list[Grade]]:
    return {t.id: store.grades(t.id) for t in store.query(limit=None)}


def test_min_score_and_named_grader_choose_the_score():
    t = calc_episode("a", "1+1", "2", "2")
    grades = {
        t.id: [grade(t, 0.6, grader="numeric"), grade(t, 0.2, source="judge", grader="judge")]
    }
    assert build_rows("sft", [t], grades, DatasetFilters()).rows == []  # 0.6 < 1.0
    assert len(build_rows("sft", [t], grades, DatasetFilters(min_score=0.5)).rows) == 1
    by_judge = build_rows("sft", [t], grades, DatasetFilters(min_score=0.5, grader="judge"))
    assert by_judge.rows == [] and by_judge.excluded == {"below_min_score": 1}
    missing = build_rows("sft", [t], grades, DatasetFilters(grader="exact"))
    assert missing.excluded == {"no_grade_by_exact": 1}
    # a grade whose grading failed does not count as a score
    broken = {t.id: [grade(t, 1.0, grader="judge", source="judge", metadata={"error": "junk"})]}
    assert build_rows("sft", [t], broken, DatasetFilters()).excluded == {"ungraded": 1}


def test_best_of_n_keeps_the_best_trace_per_task_fewer_tokens_then_id():
    long = calc_episode("a", "48*97", "4656", "4656")
    short, ep = episode("a", answer="4656")
    ep.final("4656", tokens=3)
    tie1 = calc_episode("b", "1+1", "2", "2")
    tie2 = calc_episode("b", "1+1", "2", "2")
    worse = calc_episode("b", "1+1", "2", "2")
    traces = [long, short, tie1, tie2, worse]
    grades = {t.id: [grade(t, 1.0)] for t in traces}
    grades[worse.id] = [grade(worse, 0.9)]
    built = build_rows("sft", traces, grades, DatasetFilters(min_score=0.5, best_of_n=True))
    assert built.trace_ids == sorted([short.id, min(tie1.id, tie2.id)])
    assert built.excluded == {"not_best_of_n": 3}


def test_demonstrations_in_the_prompt_are_removed_from_sft_rows(store: TraceStore):
    t, ep = episode("a", answer="4656", demos=DEMOS)
    ep.call("calculator", {"expression": "48 * 97"}, "4656")
    ep.final("4656")
    save(store, t, grade(t, 1.0))
    # the trace really had the demos in the prompt it sent
    assert t.spans[-1].llm.messages[1:5] == DEMOS

    result = build_dataset(store, "sft", store.path.parent / "sft", DatasetFilters())

    (row,) = read_rows(result.path / "train.jsonl")
    assert [m["role"] for m in row["messages"]] == [
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
    ]
    assert row["messages"][1] == {"role": "user", "content": "What is 48 * 97?"}
    assert "2 + 2" not in json.dumps(row)


def test_collection_hints_are_replaced_by_the_task_prompt_in_every_kind(store: TraceStore):
    plain = "A crate holds 48 jars. How many jars are in 97 crates?"
    hinted = f"{plain}\n\nHint: call the calculator with 97 * 48"
    meta = {"hinted": True, "task_prompt": plain, "task_answer": 4656}
    good, ep = episode("a", answer="4656", demos=DEMOS, prompt=hinted, metadata=meta)
    ep.call("calculator", {"expression": "97 * 48"}, "4656")
    ep.final("The answer is 4656.")
    bad, ep = episode("a", answer="4700", prompt=hinted, metadata=meta)
    ep.final("The answer is 4700.")
    save(store, good, grade(good, 1.0))
    save(store, bad, grade(bad, 0.0))
    assert any(m["content"] == hinted for m in good.spans[-1].llm.messages)  # the model saw it

    for kind in ("sft", "dpo", "kto"):
        result = build_dataset(store, kind, store.path.parent / kind, DatasetFilters())
        text = (result.path / "train.jsonl").read_text()
        assert "Hint:" not in text and plain in text, kind


def test_subagent_conversations_become_rows_of_their_own():
    t, ep = episode(
        "a", answer="Ten days.", prompt="How many vacation days?", tools=[CALCULATOR, RESEARCHER]
    )
    ep.subagent(
        "researcher",
        "find the vacation policy",
        "You research the handbook.",
        "Ten days a year.",
        [("search", {"query": "vacation"}, "Employees get ten days.")],
    )
    ep.final("Ten days.")
    assert len(subagent_spans(t)) == 1
    built = build_rows("sft", [t], {t.id: [grade(t, 1.0)]}, DatasetFilters())
    by_agent = {r["subagent"]: r for r in built.rows}
    assert set(by_agent) == {None, "researcher"}
    main, sub = by_agent[None], by_agent["researcher"]
    assert main["tools"] == [CALCULATOR, RESEARCHER]
    assert main["messages"][2]["tool_calls"][0]["function"]["name"] == "researcher"
    assert main["messages"][-1]["content"] == "Ten days."
    assert [m["role"] for m in sub["messages"]] == [
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
    ]
    assert sub["messages"][0]["content"] == "You research the handbook."
    assert sub["messages"][-1]["content"] == "Ten days a year."
    assert sub["tools"] == [SEARCH]
    assert "Employees get" not in json.dumps(main)  # the subagent's steps stay in its row


# --- DPO -------------------------------------------------------------------------------------


def test_dpo_splits_pairs_at_the_first_differing_assistant_turn():
    right = calc_episode("a", "48 * 97", "4656", "48 * 97 = 4656")
    misread = calc_episode("a", "48 * 97", "4656", "48 * 97 = 195", status="ok")
    wrong_call = calc_episode("a", "48 + 97", "145", "145")
    lonely = calc_episode("b", "1+1", "2", "2")  # no failing trace for this task
    grades = {
        right.id: [grade(right, 1.0)],
        misread.id: [grade(misread, 0.0, flags=["tool_result_ignored"])],
        wrong_call.id: [grade(wrong_call, 0.0)],
        lonely.id: [grade(lonely, 1.0)],
    }
    built = build_rows(
        "dpo", [right, misread, wrong_call, lonely], grades, DatasetFilters(exclude_flagged=True)
    )
    assert len(built.rows) == 2
    assert built.excluded == {"no_pair_for_task": 1}
    rows = {tuple(i["trace_ids"]): r for r, i in zip(built.rows, built.row_info, strict=True)}
    late = rows[(right.id, misread.id)]
    # shared prompt runs through the (identical) tool call and its result
    assert [m["role"] for m in late["prompt"]] == ["system", "user", "assistant", "tool"]
    assert late["chosen"] == [{"role": "assistant", "content": "48 * 97 = 4656"}]
    assert late["rejected"] == [{"role": "assistant", "content": "48 * 97 = 195"}]
    assert late["tools"] == [CALCULATOR]
    early = rows[(right.id, wrong_call.id)]
    assert [m["role"] for m in early["prompt"]] == ["system", "user"]
    assert early["chosen"][0]["tool_calls"][0]["function"]["arguments"] == {"expression": "48 * 97"}
    assert early["rejected"][0]["tool_calls"][0]["function"]["arguments"] == {
        "expression": "48 + 97"
    }
    assert [m["role"] for m in early["rejected"]] == ["assistant", "tool", "assistant"]


def test_divergence_in_a_tool_result_moves_back_to_the_assistant_turn():
    a = calc_episode("a", "rand()", "7", "7")
    b = calc_episode("a", "rand()", "3", "3")
    chosen, _ = conversation_of(a)
    rejected, _ = conversation_of(b)
    prompt, c, r = split_at_divergence(chosen, rejected)
    assert [m["role"] for m in prompt] == ["system", "user"]
    assert c[1]["content"] == "7" and r[1]["content"] == "3"
    assert split_at_divergence(chosen, chosen) is None


# --- KTO -------------------------------------------------------------------------------------


def test_kto_labels_follow_the_score_and_human_thumbs_override():
    passing = calc_episode("a", "1+1", "2", "2")
    failing = calc_episode("b", "1+1", "2", "3")
    rescued = calc_episode("c", "1+1", "2", "two")  # verifier says no, a human says yes
    vetoed = calc_episode("d", "1+1", "2", "2")  # verifier says yes, a human says no
    crashed = calc_episode("e", "1+1", "2", "", status="timeout")
    grades = {
        passing.id: [grade(passing, 1.0)],
        failing.id: [grade(failing, 0.0)],
        rescued.id: [grade(rescued, 0.0), grade(rescued, 1.0, source="human", grader="human:al")],
        vetoed.id: [grade(vetoed, 1.0), grade(vetoed, 0.0, source="human", grader="human:al")],
        crashed.id: [grade(crashed, 0.0)],
    }
    built = build_rows(
        "kto", [passing, failing, rescued, vetoed, crashed], grades, DatasetFilters()
    )
    labels = {i["task_id"]: r["label"] for r, i in zip(built.rows, built.row_info, strict=True)}
    assert labels == {"a": True, "b": False, "c": True, "d": False, "e": False}
    row = built.rows[0]
    assert [m["role"] for m in row["prompt"]] == ["system", "user"]
    assert [m["role"] for m in row["completion"]] == ["assistant", "tool", "assistant"]
    with pytest.raises(DatasetError, match="best-of-n"):
        build_rows("kto", [passing], grades, DatasetFilters(best_of_n=True))


# --- GRPO ------------------------------------------------------------------------------------


def test_grpo_rows_carry_the_task_columns_reward_functions_need():
    known = calc_episode("a", "48*97", "4656", "4656", demos=DEMOS)
    again = calc_episode("a", "48*97", "4656", "4656")
    from_meta = calc_episode(
        "b", "1+1", "2", "2", metadata={"task_answer": 2, "task_grader": "numeric"}
    )
    unknown = calc_episode("c", "1+1", "2", "2")
    tasks = {
        ("calc", "a"): Task(
            id="a",
            prompt="What is 48 * 97?",
            answer=4656,
            grader="numeric",
            metadata={"rel_tol": 0.01},
        )
    }
    built = build_rows("grpo", [known, again, from_meta, unknown], {}, DatasetFilters(), tasks)
    assert [r["task_id"] for r in built.rows] == ["a", "b"]
    a, b = built.rows
    assert a["prompt"] == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What is 48 * 97?"},
    ]
    assert (a["answer"], a["grader"], a["env"], a["task_metadata"]) == (
        4656,
        "numeric",
        "calc",
        {"rel_tol": 0.01},
    )
    assert a["tool_names"] == ["calculator"]
    assert (b["answer"], b["grader"], b["task_metadata"]) == (2, "numeric", {})
    assert built.excluded == {"duplicate_task": 1, "task_unknown": 1}


# --- the folder ------------------------------------------------------------------------------


ANSWER = {"task_answer": "x", "task_grader": "exact"}


def _populate(store: TraceStore) -> dict[str, Trace]:
    right = calc_episode("a", "48 * 97", "4656", "48 * 97 = 4656", demos=DEMOS, metadata=ANSWER)
    wrong = calc_episode("a", "48 + 97", "145", "145", metadata=ANSWER)
    secret, ep = episode(
        "s",
        answer="done",
        metadata=ANSWER,
        prompt="My key is sk-proj-ABCDEFGHIJKLMNOPQRSTUVWX, store it. Mail bob@example.com",
    )
    ep.call("calculator", {"expression": "1+1"}, "2")
    ep.final("done")
    sub, ep = episode(
        "r", answer="Ten days.", metadata=ANSWER, prompt="Vacation?", tools=[CALCULATOR, RESEARCHER]
    )
    ep.subagent(
        "researcher",
        "find it",
        "You research.",
        "Ten days.",
        [("search", {"query": "vacation"}, "ten")],
    )
    ep.final("Ten days.")
    save(store, right, grade(right, 1.0))
    save(store, wrong, grade(wrong, 0.0))
    save(store, secret, grade(secret, 1.0))
    save(store, sub, grade(sub, 1.0), grade(sub, 1.0, source="human", grader="human:al"))
    return {"right": right, "wrong": wrong, "secret": secret, "sub": sub}


GRPO_TASKS = {("calc", k): Task(id=k, prompt="p", answer="x", grader="exact") for k in "asr"}


@pytest.mark.parametrize("kind", ["sft", "dpo", "kto", "grpo"])
def test_every_kind_writes_a_folder_that_datasets_loads(
    store: TraceStore, tmp_path: Path, kind: str
):
    import datasets

    _populate(store)
    fmt = ("trl", "openai") if kind in ("sft", "dpo") else ("trl",)
    result = build_dataset(
        store, kind, tmp_path / kind, DatasetFilters(env="calc"), formats=fmt, tasks=GRPO_TASKS
    )

    assert sorted(p.name for p in result.path.iterdir()) == sorted(
        [
            "train.jsonl",
            "manifest.json",
            "SUMMARY.md",
            *(["openai.jsonl"] if "openai" in fmt else []),
        ]
    )
    written = read_rows(result.path / "train.jsonl")
    loaded = datasets.load_dataset(
        "json", data_files=str(result.path / "train.jsonl"), split="train"
    )
    assert len(loaded) == len(written) == result.rows > 0
    # what TRL gets is exactly what we wrote: no nulls added by schema unification
    assert [dict(r) for r in loaded] == written
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert manifest["kind"] == kind and manifest["rows"] == len(written)
    assert manifest["trace_ids"] == sorted(manifest["trace_ids"])
    assert manifest["filters"]["env"] == "calc"
    assert sum(manifest["counts"]["by_env"].values()) == len(written)
    assert kind.upper() in (result.path / "SUMMARY.md").read_text()
    if kind == "kto":
        assert manifest["counts"]["by_label"] == {"false": 1, "true": 3}
    if kind == "sft":
        assert manifest["counts"]["by_agent"] == {"orchestrator": 3, "researcher": 1}


def test_rows_are_scrubbed_of_planted_secrets(store: TraceStore, tmp_path: Path):
    _populate(store)
    result = build_dataset(store, "sft", tmp_path / "sft", formats=("trl", "openai"))
    for name in ("train.jsonl", "openai.jsonl"):
        text = (result.path / name).read_text()
        assert "sk-proj-ABCDEFGHIJKLMNOPQRSTUVWX" not in text
        assert "bob@example.com" not in text
        assert "[REDACTED:openai_key]" in text
    extra = build_dataset(store, "sft", tmp_path / "sft2", scrub_patterns=[r"Vacation\?"])
    assert "Vacation?" not in (extra.path / "train.jsonl").read_text()


def test_building_twice_gives_byte_identical_folders(store: TraceStore, tmp_path: Path):
    _populate(store)
    for kind in ("sft", "dpo", "kto", "grpo"):
        a = build_dataset(store, kind, tmp_path / f"{kind}-1", formats=("trl",), tasks=GRPO_TASKS)
        b = build_dataset(store, kind, tmp_path / f"{kind}-2", formats=("trl",), tasks=GRPO_TASKS)
        for name in ("train.jsonl", "manifest.json", "SUMMARY.md"):
            assert (a.path / name).read_bytes() == (b.path / name).read_bytes(), (kind, name)
    # and rebuilding into the same folder replaces it in place, leaving no temp folders
    again = build_dataset(store, "sft", tmp_path / "sft-1")
    assert (
        again.manifest["content_hash"]
        == json.loads((tmp_path / "sft-2" / "manifest.json").read_text())["content_hash"]
    )
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_openai_export_has_string_arguments_and_no_extra_columns(store: TraceStore, tmp_path: Path):
    _populate(store)
    result = build_dataset(store, "sft", tmp_path / "sft", formats=("trl", "openai"))
    rows = read_rows(result.path / "openai.jsonl")
    trl_rows = read_rows(result.path / "train.jsonl")
    assert len(rows) == len(trl_rows)
    calls = [c for r in rows for m in r["messages"] for c in m.get("tool_calls", [])]
    assert calls and all(isinstance(c["function"]["arguments"], str) for c in calls)
    assert (
        json.loads(calls[0]["function"]["arguments"])
        == trl_rows[0]["messages"][2]["tool_calls"][0]["function"]["arguments"]
    )
    assert all(set(r) == {"messages", "tools"} for r in rows)
    with pytest.raises(DatasetError, match="no KTO format"):
        build_dataset(store, "kto", tmp_path / "kto", formats=("trl", "openai"))


def test_bad_requests_fail_with_the_fix(store: TraceStore, tmp_path: Path):
    with pytest.raises(DatasetError, match="no sft rows from 0 traces"):
        build_dataset(store, "sft", tmp_path / "x")
    with pytest.raises(DatasetError, match="unknown dataset kind 'ppo'"):
        build_dataset(store, "ppo", tmp_path / "x")
    with pytest.raises(DatasetError, match="outside"):
        DatasetFilters(min_score=2)
    with pytest.raises(DatasetError, match="is not a time"):
        DatasetFilters(since="last tuesday")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    _populate(store)
    with pytest.raises(DatasetError, match="not a selftune dataset folder"):
        build_dataset(store, "sft", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_since_takes_ages_dates_and_epochs():
    assert parse_time("7d", now=1_000_000.0) == 1_000_000.0 - 7 * 86400
    assert parse_time("30m", now=1000.0) == 1000.0 - 1800
    assert parse_time("2026-05-01") == parse_time("2026-05-01T00:00:00+00:00")
    assert parse_time("1700000000") == 1_700_000_000.0


def test_durations_take_every_unit_and_a_bad_one_names_the_forms():
    assert [parse_duration(f"2{u}") for u in "smhdw"] == [2, 120, 7200, 2 * 86400, 14 * 86400]
    assert parse_duration(" 1.5 h ") == 5400
    with pytest.raises(TimeParseError, match="s, m, h, d or w"):
        parse_duration("soon")


def test_since_filter_drops_older_traces():
    old = calc_episode("a", "1+1", "2", "2")
    new = calc_episode("b", "1+1", "2", "2")
    grades = {t.id: [grade(t, 1.0)] for t in (old, new)}
    built = build_rows("sft", [old, new], grades, DatasetFilters(since=new.start))
    assert built.trace_ids == [new.id] and built.excluded == {"before_since": 1}


# --- the rows train: our template renders them with an assistant mask -------------------------


def test_sft_rows_encode_with_the_training_template(model_path: Path):
    from transformers import AutoTokenizer

    from agent.model.template import encode_for_training

    t, ep = episode(
        "a", answer="Ten days.", prompt="Vacation?", tools=[CALCULATOR, RESEARCHER], demos=DEMOS
    )
    ep.subagent(
        "researcher",
        "find it",
        "You research.",
        "Ten days.",
        [("search", {"query": "vacation"}, "ten")],
    )
    ep.final("Ten days.")
    built = build_rows("sft", [t], {t.id: [grade(t, 1.0)]}, DatasetFilters())
    tok = AutoTokenizer.from_pretrained(str(model_path))
    for row in built.rows:
        enc = encode_for_training(tok, row["messages"], row["tools"])
        masked = tok.decode(
            [i for i, m in zip(enc["input_ids"], enc["assistant_masks"], strict=True) if m]
        )
        assert "Ten days." in masked
        assert row["messages"][1]["content"] not in masked  # the user turn is not trained on
        assert '"name": "' in masked  # the tool call is


# --- the command -----------------------------------------------------------------------------


def test_cli_builds_from_the_workspace_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from typer.testing import CliRunner

    from agent.cli.dataset import dataset_app

    home = tmp_path / "ws"
    monkeypatch.setenv("SELFTUNE_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    with TraceStore(home / "traces.db") as s:
        _populate(s)
    runner = CliRunner()
    out = tmp_path / "out"
    res = runner.invoke(
        dataset_app,
        ["build", "sft", "--env", "calc", "--best-of-n", "--format", "openai", "--out", str(out)],
    )
    assert res.exit_code == 0, res.output
    assert "4 sft rows from 3 traces" in res.output
    assert (out / "openai.jsonl").is_file()
    res = runner.invoke(dataset_app, ["build", "grpo", "--env", "calc", "--min-score", "0.5"])
    assert res.exit_code == 0, res.output
    assert (home / "datasets" / "calc-grpo" / "train.jsonl").is_file()
    bad = runner.invoke(dataset_app, ["build", "ppo"])
    assert bad.exit_code == 2 and "choose one of sft, dpo, kto, grpo" in bad.output
    empty = runner.invoke(
        dataset_app, ["build", "sft", "--env", "nowhere", "--out", str(tmp_path / "e")]
    )
    assert empty.exit_code == 1 and "no sft rows" in empty.output


def test_cli_grpo_takes_answers_from_the_real_environment(tmp_path: Path, monkeypatch):
    """docs-qa's answers mix lists and numbers; its test-split tasks never become rows."""
    import datasets
    from typer.testing import CliRunner

    from agent.cli.dataset import dataset_app
    from agent.envs import load_environment

    env = load_environment("docs-qa")
    train = env.split("train")[:2]
    test = env.split("test")[:1]
    home = tmp_path / "ws"
    monkeypatch.setenv("SELFTUNE_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    with TraceStore(home / "traces.db") as s:
        for task in [*train, *test]:
            t, ep = episode(task.id, env=env.name, answer="?", prompt=task.prompt, tools=[SEARCH])
            ep.final("?")
            save(s, t)
    res = CliRunner().invoke(dataset_app, ["build", "grpo", "--env", "docs-qa", "--out", "g"])
    assert res.exit_code == 0, res.output
    rows = read_rows(tmp_path / "g" / "train.jsonl")
    assert [(r["task_id"], r["answer"], r["grader"]) for r in rows] == sorted(
        (t.id, t.answer, t.grader or env.grader) for t in train
    )
    assert json.loads((tmp_path / "g" / "manifest.json").read_text())["excluded"] == {
        "test_split": 1
    }
    loaded = datasets.load_dataset(
        "json", data_files=str(tmp_path / "g" / "train.jsonl"), split="train"
    )
    assert [dict(r) for r in loaded] == rows


@pytest.mark.slow
def test_trl_trainers_tokenize_the_rows(store: TraceStore, tmp_path: Path, model_path: Path):
    """SFT (with the extra `subagent` column and assistant-only loss), DPO and KTO trainers
    prepare our folders without complaint. Training steps are the tuner's tests."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, SFTConfig, SFTTrainer

    from agent.model.template import chat_template_for

    _populate(store)
    tok = AutoTokenizer.from_pretrained(str(model_path))
    tok.chat_template = chat_template_for(tok)
    model = AutoModelForCausalLM.from_pretrained(str(model_path))
    common = {"output_dir": str(tmp_path / "o"), "report_to": [], "bf16": False, "max_steps": 1}

    def load(kind: str):
        folder = build_dataset(store, kind, tmp_path / kind).path
        return datasets.load_dataset("json", data_files=str(folder / "train.jsonl"), split="train")

    sft = SFTTrainer(
        model=model,
        processing_class=tok,
        train_dataset=load("sft"),
        args=SFTConfig(assistant_only_loss=True, **common),
    )
    trained_on = [sum(1 for x in row if x != -100) for row in sft.train_dataset["labels"]]
    assert len(trained_on) == 4 and all(n > 0 for n in trained_on)
    dpo = DPOTrainer(
        model=model, processing_class=tok, train_dataset=load("dpo"), args=DPOConfig(**common)
    )
    row = dpo.train_dataset[0]
    assert row["chosen_ids"] != row["rejected_ids"] and row["prompt_ids"]
    kto = KTOTrainer(
        model=model, processing_class=tok, train_dataset=load("kto"), args=KTOConfig(**common)
    )
    assert sorted(kto.train_dataset["label"]) == [False, True, True, True]


def test_a_store_of_eval_traces_says_to_collect_on_the_train_split(store):
    held_out = calc_episode("h", "6+6", "12", "12", metadata={"split": "test"})
    save(store, held_out, grade(held_out, 1.0))
    with pytest.raises(DatasetError, match=r"held-out test split .*`selftune collect ENV`"):
        build_dataset(store, "sft", store.path.parent / "sft", DatasetFilters())
