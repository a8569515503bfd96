"""Selecting, grading and splitting recorded traffic for `improve --source traffic`, on a real
SQLite trace store with traces shaped as `selftune serve` records them (one llm span, tag
`traffic`). The end-to-end cycle on the real model is in test_improve_traffic.py."""

from __future__ import annotations

import asyncio
import json

import pytest
from _traces_fixtures import served_trace as served

from traces.datasets import DatasetError
from traces.feedback import record_feedback
from traces.schemas import LlmData, Span, Task, Trace, now
from traces.store import TraceStore
from tuner.traffic import (
    TrafficError,
    TrafficSelection,
    build_traffic_dataset,
    heldout_environment,
    in_heldout,
    scrubber_flags,
    select_traffic,
)


def test_the_held_out_slice_is_a_fixed_share_of_sessions():
    sessions = [f"session-{i}" for i in range(2000)]
    held = [s for s in sessions if in_heldout(s, 0.2)]
    assert 0.17 < len(held) / len(sessions) < 0.23
    # deterministic, and nested: a larger share keeps every session a smaller one held out
    assert held == [s for s in sessions if in_heldout(s, 0.2)]
    assert set(held) <= {s for s in sessions if in_heldout(s, 0.5)}


def test_the_scrubber_flags_secrets_and_personal_data_not_plain_text():
    assert scrubber_flags([{"role": "user", "content": "mail me at ann@example.com"}]) == ["email"]
    assert scrubber_flags([{"role": "user", "content": "What is 12 * 7?"}]) == []


def _sessions(holdout: float, want: bool, n: int = 200) -> list[str]:
    return [f"s{i}" for i in range(n) if in_heldout(f"s{i}", holdout) is want]


def test_selection_grades_people_first_then_verifiers_and_leaves_private_and_flagged_out(
    tmp_path,
):
    store = TraceStore(tmp_path / "traces.db")
    train_s, held_s = _sessions(0.2, False), _sessions(0.2, True)
    tasks = {
        ("calculator", "a"): Task(id="a", prompt="What is 6 * 7?", answer=42, grader="numeric"),
        ("calculator", "b"): Task(id="b", prompt="What is 9 + 1?", answer=10, grader="numeric"),
        ("calculator", "t"): Task(
            id="t", prompt="What is 5 - 3?", answer=2, grader="numeric", split="test"
        ),
    }
    up = served(store, "Capital of France?", "Paris.", train_s[0])
    corrected = served(store, "Capital of Spain?", "Lisbon.", train_s[1])
    verified = served(store, "what is 6 *  7?", "It is 42.", train_s[2])  # case and spacing aside
    wrong = served(store, "What is 9 + 1?", "It is 11.", train_s[3])
    ungraded = served(store, "Tell me a joke.", "No.", train_s[4])
    private = served(store, "My diary", "Noted.", train_s[5], request_metadata={"private": True})
    private_too = served(store, "Capital of Peru?", "Lima.", train_s[5])  # same session
    secret = served(store, "my key is sk-proj-abcdefghijklmnopqrstuv", "Ok.", train_s[6])
    test_task = served(store, "What is 5 - 3?", "2", train_s[7])
    held_up = served(store, "Capital of Italy?", "Rome.", held_s[0])
    held_down = served(store, "Capital of Chile?", "Quito.", held_s[1])
    record_feedback(store, up, True, who="ann", via="http")
    record_feedback(store, corrected, False, correction="Madrid.", who="ann", via="http")
    record_feedback(store, private_too, True, who="ann")
    record_feedback(store, held_up, True, who="bo")
    record_feedback(store, held_down, False, who="bo")

    sel = asyncio.run(select_traffic(store, since="1d", holdout=0.2, tasks=tasks))
    by_id = {i.trace_id: i for i in sel.items}
    assert private not in by_id and private_too not in by_id  # the whole session
    assert secret not in by_id and test_task not in by_id
    assert sel.excluded == {"env_test_task": 1, "private_session": 2, "scrubber_flagged": 1}
    assert (by_id[up].grade_source, by_id[up].value) == ("human", 1.0)
    assert (
        by_id[corrected].reference == "Madrid." and by_id[corrected].reference_from == "correction"
    )
    assert (by_id[verified].grade_source, by_id[verified].value) == ("verifier", 1.0)
    assert (by_id[wrong].grade_source, by_id[wrong].value) == ("verifier", 0.0)
    assert any(g.source == "verifier" for g in store.grades(verified))  # written to the store
    assert by_id[ungraded].grade_source is None
    assert {i.trace_id for i in sel.heldout} == {held_up, held_down}

    # the dataset: training sessions only, each row with its provenance
    res = build_traffic_dataset(store, sel, "sft", tmp_path / "sft")
    provenance = json.loads((res.path / "provenance.json").read_text())
    assert sorted((p["trace_id"], p["signal"]) for p in provenance) == sorted(
        [(up, "thumb_up"), (corrected, "correction"), (verified, "verifier")]
    )
    rows = [json.loads(x) for x in (res.path / "train.jsonl").read_text().splitlines()]
    assert any(r["messages"][-1]["content"] == "Madrid." for r in rows)
    dpo = build_traffic_dataset(store, sel, "dpo", tmp_path / "dpo")
    assert dpo.rows == 1
    kto = json.loads((build_traffic_dataset(store, sel, "kto", tmp_path / "kto").path
                      / "provenance.json").read_text())  # fmt: skip
    assert {p["trace_id"] for p in kto} == {up, corrected, verified, wrong}

    # the gate's slice: held-out traces whose good answer is known (a thumbs-down alone is not)
    env = heldout_environment(
        TrafficSelection.from_summary(sel.summary()), ["calculator"], tmp_path
    )
    assert [(t.id, t.answer, t.split) for t in env.tasks] == [(held_up, "Rome.", "test")]
    store.close()


def test_no_traffic_names_the_server_and_the_window(tmp_path):
    store = TraceStore(tmp_path / "traces.db")
    with pytest.raises(TrafficError, match=r"selftune serve.*--since"):
        asyncio.run(select_traffic(store, since="7d"))
    served(store, "Hi?", "Hello.", "s1")
    sel = asyncio.run(select_traffic(store))
    with pytest.raises(DatasetError, match="POST /v1/feedback"):
        build_traffic_dataset(store, sel, "sft", tmp_path / "out")
    store.close()


def test_the_judge_grades_only_unmatched_ungraded_traffic_and_its_failures_are_counted(tmp_path):
    """Unit (a scripted judge; the real SmolLM2 judges in test_improve_traffic.py): people and
    verifiers first; the judge's score becomes a stored grade and a KTO row with signal judge;
    a reply with no score leaves the trace ungraded and is counted."""
    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    store = TraceStore(tmp_path / "traces.db")
    s = _sessions(0.2, False)
    tasks = {
        ("calculator", "a"): Task(id="a", prompt="What is 6 * 7?", answer=42, grader="numeric")
    }
    human = served(store, "Capital of France?", "Paris.", s[0])
    matched = served(store, "What is 6 * 7?", "42", s[1])
    judged = served(store, "Capital of Spain?", "Madrid.", s[2])
    junk = served(store, "Tell me a joke.", "No.", s[3])
    record_feedback(store, human, True, who="ann")
    judge = FakeListChatModel(responses=["Score: 8\nRight.", "I cannot say."])

    off = asyncio.run(select_traffic(store, tasks=tasks))
    assert off.summary()["graded_by"] == {"human": 1, "ungraded": 2, "verifier": 1}
    sel = asyncio.run(select_traffic(store, tasks=tasks, judge_model=judge))
    summary = sel.summary()
    assert summary["graded_by"] == {"human": 1, "judge": 1, "ungraded": 1, "verifier": 1}
    assert (summary["judge"], summary["judge_graded"], summary["judge_failed"]) == (True, 1, 1)
    by_id = {i.trace_id: i for i in sel.items}
    assert (by_id[judged].grade_source, by_id[judged].value) == ("judge", 0.8)
    assert by_id[junk].grade_source is None
    (g,) = [g for g in store.grades(judged) if g.source == "judge"]
    assert g.raw.startswith("Score: 8")
    assert not [g for g in store.grades(junk) if g.source == "judge"]  # a failure is not stored
    kto = build_traffic_dataset(store, sel, "kto", tmp_path / "kto")
    provenance = json.loads((kto.path / "provenance.json").read_text())
    assert {(p["trace_id"], p["signal"]) for p in provenance} == {
        (human, "thumb_up"), (matched, "verifier"), (judged, "judge"),
    }  # fmt: skip
    store.close()


def test_weak_labels_become_false_kto_labels_only_when_asked_and_only_where_nothing_grades(
    tmp_path,
):
    from traces.schemas import ToolCall

    store = TraceStore(tmp_path / "traces.db")
    s = _sessions(0.2, False)
    # a repeated question points at the session's previous answer
    first = served(store, "What is the tax rate?", "Blue.", s[0])
    served(store, "what is the tax rate?", "20 %.", s[0], weak_labels=[
        {"signal": "repeated_question", "source": "implicit", "about": first}])  # fmt: skip
    # a failed tool result points at the answer, in the same session, that made the call
    t0 = now()
    caller = Trace(model="m", start=t0, end=t0 + 1, status="ok", answer="", tags=["traffic"],
                   metadata={"source": "serve", "session_id": s[1]})  # fmt: skip
    caller.spans = [Span(
        trace_id=caller.id, kind="llm", name="chat m", start=t0, end=t0 + 1, status="ok",
        llm=LlmData(messages=[{"role": "user", "content": "Weather in Oslo?"}], completion="",
                    tool_calls=[ToolCall(id="call-7", name="weather", arguments={"city": "Oslo"})],
                    model="m"),
    )]  # fmt: skip
    store.save(caller)
    for _ in range(2):  # the failed result stays in the conversation: it counts once
        served(store, "Weather in Oslo?", "Sorry.", s[1], weak_labels=[
            {"signal": "tool_error", "source": "implicit", "tool_call_id": "call-7"}])  # fmt: skip
    # a person's thumb outranks a weak label; a label about nothing recorded is unresolved
    liked = served(store, "Name a colour.", "Red.", s[2])
    served(store, "name a colour.", "Red!", s[2], weak_labels=[
        {"signal": "repeated_question", "source": "implicit", "about": liked},
        {"signal": "tool_error", "source": "implicit", "tool_call_id": "nowhere"}])  # fmt: skip
    record_feedback(store, liked, True, who="ann")

    sel = asyncio.run(select_traffic(store))
    by_id = {i.trace_id: i for i in sel.items}
    assert [w["signal"] for w in by_id[first].weak] == ["repeated_question"]
    assert [w["signal"] for w in by_id[caller.id].weak] == ["tool_error"]
    assert sel.summary()["weak_labelled"] == 2 and sel.weak_unresolved == 1

    plain = build_traffic_dataset(store, sel, "kto", tmp_path / "plain")
    plain_rows = json.loads((plain.path / "provenance.json").read_text())
    assert [(p["trace_id"], p["signal"]) for p in plain_rows] == [(liked, "thumb_up")]
    weak = build_traffic_dataset(store, sel, "kto", tmp_path / "weak", weak_labels=True)
    provenance = json.loads((weak.path / "provenance.json").read_text())
    rows = [json.loads(x) for x in (weak.path / "train.jsonl").read_text().splitlines()]
    got = {(p["trace_id"], p["signal"], r["label"]) for p, r in zip(provenance, rows, strict=True)}
    assert got == {
        (liked, "thumb_up", True),
        (first, "weak:repeated_question", False),
        (caller.id, "weak:tool_error", False),
    }
    weak_rows = [p for p in provenance if p["signal"].startswith("weak:")]
    assert all(
        p["who"] == "implicit" and p["evidence"] and p["grade_id"] is None for p in weak_rows
    )
    with pytest.raises(DatasetError, match="--method kto"):
        build_traffic_dataset(store, sel, "sft", tmp_path / "sft", weak_labels=True)
    store.close()


def test_source_both_puts_episodes_and_traffic_in_one_dataset_with_provenance(tmp_path):
    """`improve --source both`'s dataset: the environments' passing episodes since the cycle
    began and the traffic's training sessions; served traffic never counts as an episode, and
    the held-out traffic stays out."""
    from _traces_fixtures import ADD, make_trace, task

    from traces.datasets import DatasetFilters
    from traces.schemas import Grade
    from tuner.traffic import build_mixed_dataset

    store = TraceStore(tmp_path / "traces.db")
    began = now() - 1
    episode = make_trace("5", [ADD], metadata={"split": "train"})
    store.save(episode)
    store.add_grade(Grade(trace_id=episode.id, value=1.0, source="verifier", grader="numeric"))
    train_s, held_s = _sessions(0.2, False), _sessions(0.2, True)
    liked = served(store, "Capital of France?", "Paris.", train_s[0])
    held = served(store, "Capital of Italy?", "Rome.", held_s[0])
    for t in (liked, held):
        record_feedback(store, t, True, who="ann")
    sel = asyncio.run(select_traffic(store))
    filters = DatasetFilters(min_score=1.0, best_of_n=True, since=began, exclude_flagged=True)
    tasks = {("calc", "t1"): task("what is 2+3?", 5, id="t1", grader="numeric")}

    res, sides = build_mixed_dataset(store, sel, "sft", tmp_path / "both", filters, tasks=tasks)
    assert sides == {"envs": 1, "traffic": 1} and res.rows == 2
    provenance = json.loads((res.path / "provenance.json").read_text())
    assert [(p["trace_id"], p["signal"]) for p in provenance] == [
        (episode.id, "environment"),
        (liked, "thumb_up"),
    ]
    assert provenance[0]["env"] == "calc" and provenance[0]["task_id"] == "t1"
    assert held not in res.manifest["trace_ids"]
    # DPO: no pair on either side (one passing episode; thumbs, no correction): why, for both
    with pytest.raises(DatasetError, match=r"envs\..*traffic\.no_correction"):
        build_mixed_dataset(store, sel, "dpo", tmp_path / "dpo", filters, tasks=tasks)
    store.close()


def test_a_missed_question_replayed_through_the_tools_replaces_its_bare_correction(tmp_path):
    """Replay (tuner/traffic.py step 4): a question whose served answer missed a known good
    answer is played again; a right episode through the tools becomes its row (the served trace
    and the episode both in its lineage). A question that needs a tool and found no such
    episode loses its bare correction (it would teach answering without the tool); one that
    needs no tool keeps it."""
    from _traces_fixtures import make_trace

    from agent.envs import load_environment
    from traces.schemas import Grade
    from tuner.traffic import replay_environment, replay_items, traffic_rows

    store = TraceStore(tmp_path / "traces.db")
    calc = load_environment("calculator")
    a, b = calc.split("train")[:2]
    tasks = {("calculator", a.id): a, ("calculator", b.id): b}
    train_s = _sessions(0.2, False)
    replayed = served(store, a.prompt, "I think 12.", train_s[0])
    stuck = served(store, b.prompt, "About 3.", train_s[1])
    plain = served(store, "Capital of Spain?", "Lisbon.", train_s[2])
    liked = served(store, "Capital of France?", "Paris.", train_s[3])
    for t, fix in ((replayed, a.answer), (stuck, b.answer), (plain, "Madrid")):
        record_feedback(store, t, False, correction=str(fix), who="ann")
    record_feedback(store, liked, True, who="ann")
    sel = asyncio.run(select_traffic(store, holdout=0.2, tasks=tasks))

    items = replay_items(sel)
    assert {i.trace_id for i in items} == {replayed, stuck, plain}  # not the thumb up
    env = replay_environment([i for i in items if i.env == "calculator"], calc)
    assert env.name == "calculator+traffic" and env.tool_names == calc.tool_names
    assert {t.id for t in env.tasks} == {replayed, stuck}
    assert env.task(replayed).prompt == a.prompt and env.task(replayed).split == "train"
    assert env.task(replayed).grader == a.grader  # the matched task's grader, on the correction
    other = replay_environment([i for i in items if i.env is None], calc).task(plain)
    assert other.grader == "contains" and other.answer == "Madrid"

    # what the improve job found: an episode through the calculator for the first question only
    call = ("calculator", {"expression": "1+1"}, str(a.answer))
    episode = make_trace(f"The answer is {a.answer}.", [call], env=env.name, task_id=replayed)
    store.save(episode)
    store.add_grade(Grade(trace_id=episode.id, value=1.0, source="verifier", grader="numeric"))
    for i in items:
        i.replayed = True
        i.needs_tools = i.env is not None
        i.replay = episode.id if i.trace_id == replayed else None

    sft = traffic_rows(store, sel, "sft")
    by_signal = {
        info["feedback"]["signal"]: (row, info)
        for row, info in zip(sft.rows, sft.row_info, strict=True)
    }
    assert sorted(by_signal) == ["correction", "replayed:correction", "thumb_up"]
    row, info = by_signal["replayed:correction"]
    assert info["trace_ids"] == [replayed, episode.id]
    assert info["feedback"]["replay_trace_id"] == episode.id
    assert any(m.get("tool_calls") for m in row["messages"])  # the row shows the tool call
    assert by_signal["correction"][1]["trace_ids"] == [plain]  # needs no tool: kept as it is
    assert sft.excluded["correction_without_tool_trajectory"] == 1  # `stuck`
    assert stuck not in sft.trace_ids

    dpo = traffic_rows(store, sel, "dpo")
    pair = next(
        r
        for r, i in zip(dpo.rows, dpo.row_info, strict=True)
        if i["feedback"]["signal"] == "replayed:correction"
    )
    assert pair["rejected"] == [{"role": "assistant", "content": "I think 12."}]
    assert pair["chosen"][0]["tool_calls"][0]["function"]["name"] == "calculator"
    kto = traffic_rows(store, sel, "kto")
    labels = {(i["trace_ids"][-1], i["label"]) for i in kto.row_info}
    assert {(replayed, False), (episode.id, True)} <= labels
    store.close()
