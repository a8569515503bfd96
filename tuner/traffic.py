"""Improve on traffic: what people asked the served agent becomes training rows and a test.

    selftune improve calculator --source traffic --since 7d

One traffic cycle (the improve job's collect, dataset and gate steps call these):
1. `select_traffic`: the traces `selftune serve` recorded (tag `traffic`) since the window,
   less the sessions marked private (any trace of the session sent `metadata.private` or the
   `X-Selftune-Private` header) and the traces the scrubber flags (a secret or personal datum
   in what was asked or answered: `traces.scrub`).
2. grading, people first: a human grade (thumb up 1, down 0, a correction) decides; else,
   when the trace's question is exactly a task of one of the job's environments, that task's
   verifier; else the LLM judge, when a judge model is given (`[improve] judge`: the base
   model or the teacher, its grades named for it, e.g. `judge:teacher:<model>`); else the
   trace stays ungraded. A question that is one of the environments' test tasks is never
   trained on. The implicit signals the server recorded (`metadata.weak_labels`: the same
   question asked again, a failed tool call) are tied to the answer they point at.
3. `in_heldout`: a fixed share of the sessions (a hash of the session id, so the same session
   is held out in every cycle and on every machine) is held out: never trained on, replayed in
   the gate where its good answer is known (a correction, a thumbs-up answer, a matched task's
   reference), graded by containment (or the matched task's grader).
4. replay (`[improve] traffic_replay`, the improve job's collect step): a training question
   whose served answer missed a known good answer (a person's correction, or the reference of
   the environment task it matched) is played again through the improve waves (`replay_items`,
   `replay_environment`: demonstrations, hints, the answer shown, similar solved questions).
   A right episode that reached the answer through the tools (the answer-shown wave keeps
   nothing else) becomes that question's row (signal `replayed:<signal>`), with the plain
   question. A correction is only a final answer: trained as it is, on a question that needs a
   tool, it teaches the model to answer without the tool (200 calculator questions: 0 % -> 0 %
   and the general probe 73.9 % -> 39.1 %), so when such a question found no tool trajectory
   its correction row is left out (`correction_without_tool_trajectory`).
5. `build_traffic_dataset`: SFT/DPO/KTO rows from the training sessions with provenance.json;
   with `weak_labels`, KTO also labels an otherwise ungraded answer that a weak label points at
   False (signal `weak:<signal>`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tools.errors import SelftuneError
from traces.datasets import Built, DatasetError, DatasetFilters, DatasetResult, human_grade
from traces.feedback import (
    PROVENANCE_FILE,
    feedback_rows,
    private_sessions,
    row_provenance,
    session_of,
)
from traces.read import tool_calls, training_conversation
from traces.schemas import Grade, Task, Trace, TraceQuery
from traces.scrub import scrub_text
from traces.store import TraceStore
from traces.times import parse_time

TRAFFIC_TAG = "traffic"
HELDOUT_ENV = "traffic-heldout"
REPLAY_TAG = "traffic-replay"  # the episodes that replay missed traffic questions
REPLAY_SUFFIX = "+traffic"  # the replay environment of `calculator` is `calculator+traffic`
_NUMBER = re.compile(r"\s*[-+]?(\d{1,3}(,\d{3})+|\d+)?(\.\d+)?\s*")
RULE_GRADERS = ("exact", "numeric", "contains", "regex")


class TrafficError(SelftuneError, ValueError):
    """No traffic to learn from; the message says how to record some."""


def in_heldout(session: str, fraction: float) -> bool:
    """Whether `session` is in the held-out slice: sha256 of its id, read as a number in
    [0, 1), below `fraction`. Deterministic, and stable as traffic grows."""
    h = int.from_bytes(hashlib.sha256(session.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < fraction


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def question_of(messages: Sequence[Mapping[str, Any]]) -> str | None:
    """The user's question a trace answers: the last user message before the first answer."""
    first = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), None)
    users = [m for m in messages[:first] if m.get("role") == "user"]
    content = users[-1].get("content") if users else None
    return content if isinstance(content, str) else None


def scrubber_flags(messages: Sequence[Mapping[str, Any]], patterns: Sequence[str] = ()) -> list:
    """The kinds of secret or personal data the scrubber finds in a conversation's text."""
    kinds: set[str] = set()
    for m in messages:
        text = m.get("content")
        if isinstance(text, str) and text:
            scrubbed = scrub_text(text, patterns)
            if scrubbed != text:
                kinds |= {
                    part.split("]", 1)[0]
                    for part in scrubbed.split("[REDACTED:")[1:]
                    if f"[REDACTED:{part.split(']', 1)[0]}]" not in text
                }
    return sorted(kinds)


@dataclass
class TrafficItem:
    """One selected trace: its session, question, the grade that decides it and, where one is
    known, the good answer (`reference`, from `reference_from`)."""

    trace_id: str
    session: str
    question: str
    heldout: bool
    grade_source: str | None = None  # human | verifier | judge | None (ungraded)
    value: float | None = None
    correction: str | None = None
    reference: Any = None
    reference_from: str | None = None  # correction | thumb_up | task
    grader: str = "contains"
    env: str | None = None  # the environment whose task the question matched
    task_id: str | None = None
    tools: list[str] | None = None
    # implicit signals pointing at this answer: {"signal", "source", "from" (the trace that
    # showed it), "when"}
    weak: list[dict[str, Any]] = field(default_factory=list)
    used_tools: bool = False  # the served answer called a tool
    # replay (module step 4): whether it was played again, whether its question needs a tool
    # (it matched a task with tools, or the served answer called one), and the kept episode
    replayed: bool = False
    needs_tools: bool = False
    replay: str | None = None


@dataclass
class TrafficSelection:
    """What a traffic cycle works on: the items, and what was left out and why."""

    since: float | None
    holdout: float
    items: list[TrafficItem] = field(default_factory=list)
    excluded: dict[str, int] = field(default_factory=dict)
    judge: bool = False  # whether a judge graded the unmatched traces
    judge_grader: str | None = None  # which: its grades' grader name ("judge:teacher:<model>")
    judge_failed: int = 0  # unmatched traces the judge gave no usable grade (they stay ungraded)
    weak_unresolved: int = 0  # weak labels whose answer is not in the window

    @property
    def train(self) -> list[TrafficItem]:
        return [i for i in self.items if not i.heldout]

    @property
    def heldout(self) -> list[TrafficItem]:
        return [i for i in self.items if i.heldout]

    def summary(self) -> dict[str, Any]:
        """The figures a job state records (and `from_summary` reads back)."""
        graded = Counter(i.grade_source or "ungraded" for i in self.items)
        return {
            "since": self.since,
            "holdout": self.holdout,
            "traces": len(self.items),
            "sessions": len({i.session for i in self.items}),
            "graded_by": dict(sorted(graded.items())),
            "judge": self.judge,
            "judge_grader": self.judge_grader,
            "judge_graded": graded.get("judge", 0),
            "judge_failed": self.judge_failed,
            "weak_labelled": sum(bool(i.weak) and i.grade_source is None for i in self.items),
            "weak_unresolved": self.weak_unresolved,
            "train_traces": len(self.train),
            "heldout_traces": len(self.heldout),
            "heldout_sessions": sorted({i.session for i in self.heldout}),
            "excluded": dict(self.excluded),
            "items": [asdict(i) for i in self.items],
        }

    @classmethod
    def from_summary(cls, data: Mapping[str, Any]) -> TrafficSelection:
        return cls(
            since=data.get("since"),
            holdout=data["holdout"],
            items=[TrafficItem(**i) for i in data.get("items", [])],
            excluded=dict(data.get("excluded", {})),
            judge=data.get("judge", False),
            judge_grader=data.get("judge_grader"),
            judge_failed=data.get("judge_failed", 0),
            weak_unresolved=data.get("weak_unresolved", 0),
        )


def check_traffic(store: TraceStore, since: float | str | None) -> float | None:
    """The window's start (epoch seconds, None: all); TrafficError when no traffic was recorded
    in it."""
    when = None if since is None else parse_time(since)
    if not store.count(TraceQuery(tag=TRAFFIC_TAG, since=when, limit=None)):
        window = f" since {since}" if since is not None else ""
        raise TrafficError(
            f"no traffic recorded{window} in {store.path}: serve the agent with `selftune serve` "
            "(it records every chat completion, tag 'traffic') and let people use it, or widen "
            "--since"
        )
    return when


def weak_targets(traces: Sequence[Trace]) -> tuple[dict[str, list[dict[str, Any]]], int]:
    """The answers the recorded weak labels point at: trace id -> its labels, and how many
    labels point at no trace among `traces`. A repeated question points at the session's
    previous answer (`about`); a failed tool result at the answer, in the same session, that
    made the call (`tool_call_id`). A label repeated in later requests of a conversation (the
    failed result stays in its history) counts once."""
    calls: dict[tuple[str, str], str] = {}
    for t in traces:
        for span in t.spans:
            for call in span.llm.tool_calls if span.llm else ():
                calls.setdefault((session_of(t), call.id), t.id)
    ids = {t.id for t in traces}
    found: dict[str, dict[str, dict[str, Any]]] = {}
    unresolved = 0
    for t in sorted(traces, key=lambda t: (t.start, t.id)):
        for label in t.metadata.get("weak_labels") or ():
            signal = str(label.get("signal"))
            if signal == "repeated_question":
                target = label.get("about") if label.get("about") in ids else None
            else:
                target = calls.get((session_of(t), str(label.get("tool_call_id"))))
            if target is None:
                unresolved += 1
                continue
            found.setdefault(target, {}).setdefault(
                signal,
                {"signal": signal, "source": label.get("source", "implicit"), "from": t.id,
                 "when": t.start},
            )  # fmt: skip
    return {k: list(v.values()) for k, v in found.items()}, unresolved


def task_index(tasks: Mapping[tuple[str, str], Task]) -> dict[str, tuple[str, Task]]:
    """Environments' tasks by their normalised prompt (exact match, case and spacing aside)."""
    return {_norm(t.prompt): (env, t) for (env, _), t in tasks.items()}


async def select_traffic(
    store: TraceStore,
    *,
    since: float | str | None = None,
    holdout: float = 0.2,
    tasks: Mapping[tuple[str, str], Task] | None = None,
    judge_model: Any = None,
    judge_grader: str = "judge",
    scrub_patterns: Sequence[str] = (),
) -> TrafficSelection:
    """Select and grade recorded traffic (see the module's steps 1-3). Verifier and judge
    grades are written to the store like any grade, a judge's under `judge_grader` (which judge
    it was: tuner.teacher.JudgeModel.grader). Raises TrafficError when nothing at all was
    recorded in the window."""
    from traces.graders import GraderError, agrade_trace

    when = check_traffic(store, since)
    query = TraceQuery(tag=TRAFFIC_TAG, since=when, limit=None)
    traces = [t for t in store.query(query, with_spans=True) if t.status != "running"]
    by_prompt = task_index(tasks or {})
    excluded: Counter[str] = Counter()
    private = private_sessions(traces)
    weak, unresolved = weak_targets(traces)
    sel = TrafficSelection(
        since=when,
        holdout=holdout,
        judge=judge_model is not None,
        weak_unresolved=unresolved,
        judge_grader=judge_grader if judge_model is not None else None,
    )
    for t in sorted(traces, key=lambda t: (t.start, t.id)):
        session = session_of(t)
        if session in private:
            excluded["private_session"] += 1
            continue
        messages, _ = training_conversation(t)
        question = question_of(messages)
        if question is None or not any(m.get("role") == "assistant" for m in messages):
            excluded["no_question_or_answer"] += 1
            continue
        if scrubber_flags(messages, scrub_patterns):
            excluded["scrubber_flagged"] += 1
            continue
        item = TrafficItem(t.id, session, question, in_heldout(session, holdout))
        item.weak = weak.get(t.id, [])
        item.used_tools = bool(tool_calls(t))
        matched = by_prompt.get(_norm(question))
        if matched is not None:
            env, task = matched
            if task.split == "test":  # the environments' held-out tests stay unseen
                excluded["env_test_task"] += 1
                continue
            item.env, item.task_id, item.tools = env, task.id, task.tools
            item.reference, item.reference_from = task.answer, "task"
            if task.grader in RULE_GRADERS:
                item.grader = task.grader
        grades = store.grades(t.id)
        human = human_grade(grades)
        if human is not None:
            item.grade_source, item.value = "human", human.value
            item.correction = human.metadata.get("correction")
            if item.correction:
                item.reference, item.reference_from, item.grader = (
                    item.correction, "correction", "contains",
                )  # fmt: skip
            elif human.value >= 0.5 and item.reference is None and t.answer:
                item.reference, item.reference_from = t.answer, "thumb_up"
        elif matched is not None or judge_model is not None:
            task = matched[1] if matched else Task(id=t.id, prompt=question, grader="judge")
            name = "judge" if matched is None else None
            try:
                grade = await agrade_trace(task, t, name, judge_model=judge_model)
            except GraderError:  # an environment's own grade function: not replayable here
                grade = None
            if grade is not None and name == "judge":
                grade = grade.model_copy(update={"grader": judge_grader})
            if grade is not None and not grade.metadata.get("error"):
                store.add_grade(grade)
                item.grade_source, item.value = grade.source, grade.value
            elif name == "judge":
                sel.judge_failed += 1
        sel.items.append(item)
    sel.excluded = dict(sorted(excluded.items()))
    return sel


def replay_items(selection: TrafficSelection) -> list[TrafficItem]:
    """The training questions worth playing again: the served answer was graded wrong (value
    under 0.5) and a good answer is known (a correction, or the matched task's reference)."""
    return [
        i
        for i in selection.train
        if i.reference is not None
        and i.reference_from in ("correction", "task")
        and i.value is not None
        and i.value < 0.5
    ]


def _grader_for(item: TrafficItem, base: Task | None) -> str | None:
    """The grader a replayed question is played with: its matched task's; else numeric for a
    correction that is a number ("1,333", "-2.5"), else contains."""
    if base is not None:
        return base.grader
    return "numeric" if _NUMBER.fullmatch(str(item.reference)) else "contains"


def replay_environment(items: Sequence[TrafficItem], source: Any) -> Any:
    """The questions `items` as train tasks of a copy of the environment `source` (its tools,
    corpus and Chroma collection, demonstrations, system prompt and grader), named
    `<source>+traffic`. A task's id is the served trace's id; its answer is the known good one.
    A matched task's hint comes along only when that answer agrees with the task's reference
    (a correction may say the task is wrong)."""
    from traces.graders import rule

    tasks = []
    for i in items:
        base = None
        if i.env == source.name and i.task_id is not None:
            try:
                base = source.task(i.task_id)
            except KeyError:
                base = None
        grader = _grader_for(i, base)
        hint = None
        if base is not None and base.hint:
            check = rule(base.grader or source.grader)
            agrees = i.reference_from == "task" or (
                check is not None and check(str(i.reference), base.answer, base.metadata).score >= 1
            )
            hint = base.hint if agrees else None
        tasks.append(
            Task(
                id=i.trace_id,
                prompt=i.question,
                answer=i.reference,
                grader=grader,
                split="train",
                tools=base.tools if base is not None else None,
                hint=hint,
                metadata={
                    **(base.metadata if base is not None else {}),
                    "traffic": {
                        "trace_id": i.trace_id,
                        "session_id": i.session,
                        "reference_from": i.reference_from,
                    },
                },
            )  # fmt: skip
        )
    return dataclasses.replace(
        source,
        name=f"{source.name}{REPLAY_SUFFIX}",
        tasks=tasks,
        collection=source.collection or f"env-{source.name}",
    )


def _first_answer(messages: Sequence[Mapping[str, Any]]) -> int | None:
    return next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), None)


def _built(kind: str, entries: Sequence[tuple[dict, dict]], excluded: Mapping | None = None):
    """(row, row_info) pairs as one Built; its trace and grade ids are the infos'."""
    return Built(
        kind,
        [e[0] for e in entries],
        [e[1] for e in entries],
        sorted({t for _, i in entries for t in i["trace_ids"]}),
        sorted({g for _, i in entries for g in i["grade_ids"]}),
        dict(excluded or {}),
    )


def _replay_rows(
    kind: str,
    pairs: Sequence[tuple[Trace, Trace, TrafficItem]],
    grades: Mapping[str, Sequence[Grade]],
) -> Built:
    """Rows for replayed questions: the kept episode (plain question, its tool calls, the
    answer) in place of the served answer. sft: the episode; dpo: the episode chosen, the
    served answer rejected; kto: the served answer False and the episode True. Provenance: the
    served trace, the feedback or verdict that graded it, the kept episode (`replay_trace_id`)
    and where the good answer came from (`reference_from`)."""
    from traces.datasets import scoring_grade

    entries = []
    for orig, rep, item in sorted(pairs, key=lambda p: p[0].id):
        # the grade that failed the served answer (a replayed item always has one)
        g = human_grade(grades.get(orig.id, ())) or scoring_grade(grades.get(orig.id, ()))
        if g is None:
            continue
        said = "correction" if item.reference_from == "correction" else (
            "thumb_down" if item.grade_source == "human" else str(item.grade_source)
        )  # fmt: skip
        r_msgs, r_tools = training_conversation(rep)
        o_msgs, o_tools = training_conversation(orig)
        rf, of = _first_answer(r_msgs), _first_answer(o_msgs)
        if not rf:
            continue
        if kind == "sft":
            made = [(f"replayed:{said}", {"messages": r_msgs, "subagent": None, "tools": r_tools},
                     None)]  # fmt: skip
        elif kind == "dpo":
            if not of:
                continue
            row = {"prompt": r_msgs[:rf], "chosen": r_msgs[rf:], "rejected": o_msgs[of:],
                   "tools": r_tools}  # fmt: skip
            made = [(f"replayed:{said}", row, None)]
        else:
            made = [(f"replayed:{said}", {"prompt": r_msgs[:rf], "completion": r_msgs[rf:],
                                          "label": True, "tools": r_tools}, True)]  # fmt: skip
            if of:
                made.insert(0, (said, {"prompt": o_msgs[:of], "completion": o_msgs[of:],
                                       "label": False, "tools": o_tools}, False))  # fmt: skip
        for signal, row, label in made:
            provenance = {
                **row_provenance(orig, g, signal),
                "via": g.metadata.get("via") or "improve",
                "replay_trace_id": rep.id if label is not False else None,
                "reference_from": item.reference_from,
            }
            info = {
                "env": rep.env, "task_id": rep.task_id,
                "trace_ids": [orig.id, rep.id] if label is not False else [orig.id],
                "grade_ids": (g.id,), "label": label, "subagent": None,
                "feedback": provenance,
            }  # fmt: skip
            entries.append((row, info))
    return _built(kind, entries)


def _graded_rows(
    kind: str, traces: Sequence[Trace], grades: Mapping[str, Sequence[Grade]]
) -> Built:
    """Rows from verifier- and judge-graded traces: SFT a passing one (score 1, no flags), KTO
    each labelled by its grade; DPO none (a pair needs a correction)."""
    from traces.datasets import scoring_grade

    entries, excluded = [], Counter()
    for t in sorted(traces, key=lambda t: t.id):
        g = scoring_grade(grades.get(t.id, ()))
        if g is None:
            excluded["ungraded"] += 1
            continue
        messages, tools = training_conversation(t)
        first = _first_answer(messages)
        passed = g.value >= 1.0 and not g.flags and t.status == "ok"
        if kind == "dpo" or first is None or (kind == "sft" and not passed):
            excluded["dpo_needs_correction" if kind == "dpo" else "not_passing"] += 1
            continue
        if kind == "sft":
            row = {"messages": messages, "subagent": None, "tools": tools}
        else:
            label = g.value >= 0.5 and not g.flags
            row = {"prompt": messages[:first], "completion": messages[first:], "label": label,
                   "tools": tools}  # fmt: skip
        provenance = {
            "trace_id": t.id, "grade_id": g.id, "signal": g.source, "who": g.grader,
            "when": g.created, "via": "improve", "session_id": t.metadata.get("session_id"),
        }  # fmt: skip
        info = {
            "env": t.env, "task_id": t.task_id, "trace_ids": [t.id], "grade_ids": (g.id,),
            "label": row.get("label"), "subagent": None, "feedback": provenance,
        }  # fmt: skip
        entries.append((row, info))
    return _built(kind, entries, excluded)


def _weak_rows(traces: Sequence[Trace], items: Mapping[str, TrafficItem]) -> Built:
    """KTO rows labelled False by the implicit signals pointing at each answer (its first
    signal names the row's `signal`: weak:repeated_question, weak:tool_error)."""
    entries, excluded = [], Counter()
    for t in sorted(traces, key=lambda t: t.id):
        messages, tools = training_conversation(t)
        first = _first_answer(messages)
        if not first:
            excluded["no_llm_call"] += 1
            continue
        label = sorted(items[t.id].weak, key=lambda w: w["signal"])[0]
        row = {"prompt": messages[:first], "completion": messages[first:], "label": False,
               "tools": tools}  # fmt: skip
        provenance = {
            "trace_id": t.id, "grade_id": None, "signal": f"weak:{label['signal']}",
            "who": label["source"], "when": label["when"], "via": "serve",
            "session_id": t.metadata.get("session_id"), "evidence": label["from"],
        }  # fmt: skip
        info = {
            "env": t.env, "task_id": t.task_id, "trace_ids": [t.id], "grade_ids": (),
            "label": False, "subagent": None, "feedback": provenance,
        }  # fmt: skip
        entries.append((row, info))
    return _built("kto", entries, excluded)


def traffic_rows(
    store: TraceStore, selection: TrafficSelection, kind: str, *, weak_labels: bool = False
) -> Built:
    """The `kind` rows (sft, dpo, kto) of the selection's training sessions only: people's
    feedback rows (traces.feedback.feedback_rows), then verifier/judge-graded ones, then (KTO
    with `weak_labels`) answers that only an implicit signal grades, labelled False, then the
    replayed questions' kept episodes (`_replay_rows`, in place of their served answer's rows).
    A question that needs a tool, was replayed and found no tool trajectory loses its
    correction row. Each row's provenance is its row_info's "feedback". DatasetError for
    `weak_labels` with another kind."""
    if weak_labels and kind != "kto":
        raise DatasetError(
            f"weak labels are KTO labels (an answer the user asked again about is not good), not "
            f"{kind} rows: use --method kto, or drop --weak-labels"
        )
    train = selection.train
    traces = [store.get(i.trace_id) for i in train]
    grades = {t.id: store.grades(t.id) for t in traces}
    items = {i.trace_id: i for i in train}
    replayed = {i.trace_id: store.get(i.replay) for i in train if i.replay}
    # a question that needs a tool and found no tool trajectory: its bare correction would teach
    # answering without the tool (module step 4)
    no_trajectory = {i.trace_id for i in train if i.replayed and not i.replay and i.needs_tools}
    human_ids = {i.trace_id for i in train if i.grade_source == "human"} - replayed.keys()
    weak_ids = {i.trace_id for i in train if weak_labels and i.grade_source is None and i.weak}
    people = feedback_rows(kind, [t for t in traces if t.id in human_ids], grades)
    keep = [
        n
        for n, info in enumerate(people.row_info)
        if not (
            info["trace_ids"][0] in no_trajectory and info["feedback"]["signal"] == "correction"
        )
    ]
    dropped = len(people.rows) - len(keep)
    people = dataclasses.replace(
        people, rows=[people.rows[n] for n in keep], row_info=[people.row_info[n] for n in keep]
    )
    rest = human_ids | weak_ids | replayed.keys()
    graded = _graded_rows(kind, [t for t in traces if t.id not in rest], grades)
    weak = _weak_rows([t for t in traces if t.id in weak_ids], items)
    pairs = [(t, replayed[t.id], items[t.id]) for t in traces if t.id in replayed]
    replay = _replay_rows(kind, pairs, grades)
    excluded = Counter(people.excluded) + Counter(graded.excluded) + Counter(weak.excluded)
    if dropped:
        excluded["correction_without_tool_trajectory"] += dropped
    parts = (people, graded, weak, replay)
    return Built(
        kind,
        [r for b in parts for r in b.rows],
        [r for b in parts for r in b.row_info],
        sorted({t for b in parts for i in b.row_info for t in i["trace_ids"]}),
        sorted({g for b in parts for i in b.row_info for g in i["grade_ids"]}),
        dict(sorted(excluded.items())),
    )


def _env_provenance(info: Mapping[str, Any]) -> dict[str, Any]:
    """A provenance entry for a row from an environment's graded episodes (no person, no
    session): its traces and task."""
    return {
        "trace_id": info["trace_ids"][0], "trace_ids": list(info["trace_ids"]), "grade_id": None,
        "signal": "environment", "who": info.get("source", "self"), "when": None,
        "via": "improve", "session_id": None, "env": info["env"], "task_id": info["task_id"],
    }  # fmt: skip


def _write(built: Built, out: str | Path, filters: DatasetFilters, scrub_patterns) -> DatasetResult:
    """Write the dataset like every dataset, plus provenance.json (one entry per row, in order)."""
    from traces.datasets import write_dataset

    result = write_dataset(built, out, filters, scrub_patterns=scrub_patterns)
    rows = [i.get("feedback") or _env_provenance(i) for i in built.row_info]
    text = json.dumps(rows, indent=1, ensure_ascii=False, default=str) + "\n"
    (result.path / PROVENANCE_FILE).write_text(text, encoding="utf-8")
    return result


def build_traffic_dataset(
    store: TraceStore,
    selection: TrafficSelection,
    kind: str,
    out: str | Path,
    *,
    scrub_patterns: Sequence[str] = (),
    weak_labels: bool = False,
) -> DatasetResult:
    """A `kind` dataset (sft, dpo, kto) of `traffic_rows`, written like every dataset, plus
    provenance.json (one entry per row, in order). DatasetError if there is no row."""
    built = traffic_rows(store, selection, kind, weak_labels=weak_labels)
    if not built.rows:
        why = ", ".join(f"{r}: {n}" for r, n in built.excluded.items()) or "no training sessions"
        raise DatasetError(
            f"no {kind} rows from {len(selection.train)} training traces of traffic ({why}): "
            "give feedback with POST /v1/feedback, or widen --since"
        )
    return _write(built, out, DatasetFilters(since=selection.since), scrub_patterns)


def build_mixed_dataset(
    store: TraceStore,
    selection: TrafficSelection,
    kind: str,
    out: str | Path,
    filters: DatasetFilters,
    *,
    tasks: Mapping[tuple[str, str], Task] | None = None,
    scrub_patterns: Sequence[str] = (),
    weak_labels: bool = False,
    augment: Any = None,
) -> tuple[DatasetResult, dict[str, int]]:
    """`improve --source both`: one dataset from the environments' graded episodes that match
    `filters` (traces.datasets.build_rows; served traffic is never among them) and the traffic's
    training sessions (`traffic_rows`). provenance.json has an entry per row (signal
    `environment` for an episode's row). Returns it and the rows from each side; DatasetError
    when neither side has a row, saying why for both."""
    from traces.datasets import augment_rows, build_rows

    since = None if filters.since is None else parse_time(filters.since)
    episodes = [
        t
        for t in store.query(TraceQuery(env=filters.env, since=since, limit=None), with_spans=True)
        if TRAFFIC_TAG not in t.tags and REPLAY_TAG not in t.tags  # replays: traffic's rows
    ]
    env = build_rows(kind, episodes, {t.id: store.grades(t.id) for t in episodes}, filters, tasks)
    if augment is not None and kind == "sft":
        env = augment_rows(env, augment)
    traffic = traffic_rows(store, selection, kind, weak_labels=weak_labels)
    excluded = {f"envs.{k}": n for k, n in env.excluded.items()}
    excluded.update({f"traffic.{k}": n for k, n in traffic.excluded.items()})
    built = Built(
        kind,
        env.rows + traffic.rows,
        env.row_info + traffic.row_info,
        sorted({*env.trace_ids, *traffic.trace_ids}),
        sorted({*env.grade_ids, *traffic.grade_ids}),
        dict(sorted(excluded.items())),
    )
    if not built.rows:
        why = ", ".join(f"{r}: {n}" for r, n in built.excluded.items()) or "no traces"
        raise DatasetError(
            f"no {kind} rows from {len(episodes)} episodes nor {len(selection.train)} training "
            f"traces of traffic ({why}): collect more tasks (--collect-limit), give feedback with "
            "POST /v1/feedback, or widen --since"
        )
    result = _write(built, out, filters, scrub_patterns)
    return result, {"envs": len(env.rows), "traffic": len(traffic.rows)}


def heldout_environment(selection: TrafficSelection, tool_names: Sequence[str], where: Path):
    """The held-out slice as an in-memory environment the gate plays (test split): one task per
    held-out trace whose good answer is known; None when no held-out trace has one."""
    from agent.envs import Environment

    tasks = [
        Task(
            id=i.trace_id,
            prompt=i.question,
            answer=i.reference,
            grader=i.grader,
            split="test",
            tools=i.tools,
            metadata={"session_id": i.session, "kind": i.reference_from},
        )
        for i in selection.heldout
        if i.reference is not None
    ]
    if not tasks:
        return None
    return Environment(
        name=HELDOUT_ENV, path=where, tasks=tasks, tool_names=list(tool_names), grader="contains"
    )
