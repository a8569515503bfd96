"""Dataset builders: graded traces in, training rows out, in exactly the formats TRL reads.

- `sft`:  `{"messages", "tools", "subagent"}`, one row per passing conversation; subagent
  conversations are rows of their own (`subagent` = its name, null for the orchestrator; TRL
  ignores the extra column). Few-shot demonstrations that were in the prompt are dropped from
  the row, so the model learns to do zero-shot what it did with examples (context distillation).
- `dpo`:  `{"prompt", "chosen", "rejected", "tools"}` from tasks with a passing and a failing
  trace, split at the first assistant turn where the two conversations differ.
- `kto`:  `{"prompt", "completion", "label", "tools"}`, one row per graded or thumbed trace:
  the prompt is everything before the first assistant turn, the completion the rest.
- `grpo`: `{"prompt", "answer", "grader", "task_id", "env", "task_metadata", "tool_names"}`,
  one row per task; TRL passes the extra columns to the reward functions.

Pass or fail: a human thumb (the latest human grade) decides when there is one; otherwise the
trace's score (the grade by `grader` if named, else its best verifier grade, else its best
judge grade) against `min_score`. A trace run on a task of the test split is never used: the
eval gate measures on those tasks.

The builders are pure functions over traces (with spans) and their grades; `build_dataset`
reads them from a `TraceStore`, scrubs them (`traces.scrub`) and writes a folder with
`train.jsonl`, `manifest.json` and `SUMMARY.md` (and `openai.jsonl` if asked). The same traces
always give byte-identical files: rows are sorted by stable keys and nothing records the time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from tools.errors import SelftuneError
from traces.read import subagent_spans, trace_tokens, training_conversation
from traces.schemas import Grade, Task, Trace, TraceQuery
from traces.times import TimeParseError, parse_time

DatasetKind = Literal["sft", "dpo", "kto", "grpo"]
DATASET_KINDS: tuple[str, ...] = ("sft", "dpo", "kto", "grpo")
FORMATS: tuple[str, ...] = ("trl", "openai")
DATASET_SCHEMA_VERSION = 1
TRAIN_FILE = "train.jsonl"
OPENAI_FILE = "openai.jsonl"
MANIFEST_FILE = "manifest.json"
SUMMARY_FILE = "SUMMARY.md"
_EPS = 1e-9  # a score within this of min_score passes (1.0 stored as 0.9999999999)


class DatasetError(SelftuneError, ValueError):
    """A dataset cannot be built as asked; the message says what to change."""


@dataclass(frozen=True)
class DatasetFilters:
    """Which traces a dataset uses. Recorded as given in the manifest."""

    env: str | None = None
    min_score: float = 1.0  # pass/fail threshold (sft: filter, dpo/kto: the label)
    exclude_flagged: bool = False  # drop traces whose grades carry reward-hacking flags
    best_of_n: bool = False  # sft/dpo: only the best passing trace per task
    since: float | str | None = None  # epoch seconds, ISO date/time, or "7d", "12h", "30m"
    grader: str | None = None  # score by this grader's grade only
    max_pairs_per_task: int = 4  # dpo: at most this many pairs per task

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_score <= 1.0:
            raise DatasetError(
                f"min_score {self.min_score} is outside [0, 1]: grades are in [0, 1]"
            )
        if self.max_pairs_per_task < 1:
            raise DatasetError(
                f"max_pairs_per_task must be at least 1, got {self.max_pairs_per_task}"
            )
        if self.since is not None:
            try:
                parse_time(self.since)  # fail early, with the message, on a bad value
            except TimeParseError as e:
                raise DatasetError(f"--since {e}") from None


@dataclass
class Built:
    """Rows of one kind with where they came from. `row_info[i]` describes `rows[i]`."""

    kind: str
    rows: list[dict[str, Any]]
    row_info: list[dict[str, Any]]  # {"env", "task_id", "trace_ids", "label", "subagent"}
    trace_ids: list[str]
    grade_ids: list[str]
    excluded: dict[str, int] = field(default_factory=dict)  # reason -> traces dropped


@dataclass
class DatasetResult:
    path: Path
    manifest: dict[str, Any]

    @property
    def rows(self) -> int:
        return self.manifest["rows"]


# --- grades ----------------------------------------------------------------------------------


def scoring_grade(grades: Sequence[Grade], grader: str | None = None) -> Grade | None:
    """The grade that scores a trace: `grader`'s if named, else the best verifier grade, else the
    best judge grade. Grades whose grading failed (`metadata["error"]`) do not count."""
    usable = [g for g in grades if g.source != "human" and not g.metadata.get("error")]
    if grader is not None:
        named = [g for g in usable if g.grader == grader]
        return max(named, key=lambda g: g.created) if named else None
    for source in ("verifier", "judge"):
        pool = [g for g in usable if g.source == source]
        if pool:
            return max(pool, key=lambda g: (g.value, g.grader))
    return None


def human_grade(grades: Sequence[Grade]) -> Grade | None:
    """The latest human thumb, if any (value 1.0 up, 0.0 down)."""
    humans = [g for g in grades if g.source == "human"]
    return max(humans, key=lambda g: (g.created, g.id)) if humans else None


@dataclass(frozen=True)
class Verdict:
    """Whether a trace passes, by what score, and which grades said so."""

    passed: bool | None  # None: no grade to judge by
    score: float | None
    grade_ids: tuple[str, ...]
    flagged: bool
    human: bool | None  # the human thumb, if any


def verdict(grades: Sequence[Grade], filters: DatasetFilters) -> Verdict:
    """Pass/fail of one trace: a human thumb decides when present, else score >= min_score."""
    g = scoring_grade(grades, filters.grader)
    h = human_grade(grades)
    ids = tuple(x.id for x in (g, h) if x is not None)
    flagged = any(x.flags for x in grades if x.source != "human")
    human = None if h is None else h.value >= 0.5
    score = None if g is None else g.value
    if human is not None:
        passed: bool | None = human
    elif score is not None:
        passed = score >= filters.min_score - _EPS
    else:
        passed = None
    return Verdict(passed, score, ids, flagged, human)


# --- selecting traces ------------------------------------------------------------------------


def _task_key(trace: Trace) -> tuple[str, str]:
    # traces without a task id form a group of their own
    return (trace.env or "", trace.task_id or f"trace:{trace.id}")


def _lookup_task(trace: Trace, tasks: Mapping[tuple[str, str], Task] | None) -> Task | None:
    if tasks is None or trace.task_id is None:
        return None
    return tasks.get((trace.env or "", trace.task_id))


class _Selection:
    """Traces with their verdicts, after the filters every kind shares."""

    def __init__(
        self,
        traces: Iterable[Trace],
        grades: Mapping[str, Sequence[Grade]],
        filters: DatasetFilters,
        tasks: Mapping[tuple[str, str], Task] | None,
    ):
        self.filters = filters
        self.excluded: Counter[str] = Counter()
        self.kept: list[tuple[Trace, Verdict]] = []
        since = None if filters.since is None else parse_time(filters.since)
        for t in sorted(traces, key=lambda t: t.id):
            task = _lookup_task(t, tasks)
            if filters.env is not None and t.env != filters.env:
                self.excluded["other_env"] += 1
            elif since is not None and t.start < since:
                self.excluded["before_since"] += 1
            elif (task is not None and task.split == "test") or t.metadata.get("split") == "test":
                self.excluded["test_split"] += 1
            else:
                self.kept.append((t, verdict(grades.get(t.id, ()), filters)))

    def drop(self, reason: str) -> None:
        self.excluded[reason] += 1


def _rank_key(item: tuple[Trace, Verdict]) -> tuple:
    """Best first: higher score, then fewer tokens, then trace id."""
    t, v = item
    return (-(v.score if v.score is not None else 1.0), trace_tokens(t), t.id)


def _passing(sel: _Selection) -> list[tuple[Trace, Verdict]]:
    out = []
    for t, v in sel.kept:
        if t.status != "ok":
            sel.drop(f"status_{t.status}")
        elif v.passed is None:
            sel.drop(
                "ungraded" if sel.filters.grader is None else f"no_grade_by_{sel.filters.grader}"
            )
        elif v.human is False:
            sel.drop("human_thumbs_down")
        elif not v.passed:
            sel.drop("below_min_score")
        elif sel.filters.exclude_flagged and v.flagged:
            sel.drop("flagged")
        else:
            out.append((t, v))
    return out


def _best_per_task(
    items: list[tuple[Trace, Verdict]], sel: _Selection
) -> list[tuple[Trace, Verdict]]:
    groups: dict[tuple[str, str], list[tuple[Trace, Verdict]]] = defaultdict(list)
    for item in items:
        groups[_task_key(item[0])].append(item)
    best = []
    for key in sorted(groups):
        ranked = sorted(groups[key], key=_rank_key)
        best.append(ranked[0])
        for _ in ranked[1:]:
            sel.drop("not_best_of_n")
    return best


# --- the builders ----------------------------------------------------------------------------


def row_source(trace: Trace) -> str:
    """Who produced a trace: its `source:<name>` tag ("teacher" for a teacher's episodes), else
    "self" (the model being trained)."""
    return next((t.split(":", 1)[1] for t in trace.tags if t.startswith("source:")), "self")


def _finish(kind: str, sel: _Selection, entries: list[tuple[tuple, dict, dict]]) -> Built:
    entries.sort(key=lambda e: e[0])
    rows = [e[1] for e in entries]
    info = [e[2] for e in entries]
    sources = {t.id: row_source(t) for t, _ in sel.kept}
    for i in info:  # a row's source is its first (for DPO: its chosen) trace's
        i["source"] = sources.get(i["trace_ids"][0], "self")
    trace_ids = sorted({tid for i in info for tid in i["trace_ids"]})
    grade_ids = sorted({gid for i in info for gid in i.pop("grade_ids", ())})
    return Built(kind, rows, info, trace_ids, grade_ids, dict(sorted(sel.excluded.items())))


def sft_rows(
    traces: Iterable[Trace],
    grades: Mapping[str, Sequence[Grade]],
    filters: DatasetFilters = DatasetFilters(),
    tasks: Mapping[tuple[str, str], Task] | None = None,
) -> Built:
    """SFT rows from passing traces with status "ok": the orchestrator's conversation (demos
    removed) and one row per subagent conversation that ended ok."""
    sel = _Selection(traces, grades, filters, tasks)
    items = _passing(sel)
    if filters.best_of_n:
        items = _best_per_task(items, sel)
    entries = []
    for t, v in items:
        scopes: list[tuple[str | None, str | None]] = [(None, None)]
        scopes += [
            (s.id, str(s.attributes["subagent"]))
            for s in subagent_spans(t)
            if s.attributes.get("status", s.status) == "ok"
        ]
        for i, (span_id, name) in enumerate(scopes):
            messages, tools = training_conversation(t, span_id)
            if not any(m.get("role") == "assistant" for m in messages):
                sel.drop("no_llm_call")
                continue
            row = {"messages": messages, "tools": tools, "subagent": name}
            meta = {
                "env": t.env,
                "task_id": t.task_id,
                "trace_ids": [t.id],
                "grade_ids": v.grade_ids,
                "label": None,
                "subagent": name,
            }
            entries.append(((*_task_key(t), t.id, i), row, meta))
    return _finish("sft", sel, entries)


def _comparable(message: dict[str, Any]) -> tuple:
    """A message without its call ids (they are random per run), for finding the divergence."""
    calls = tuple(
        (c["function"]["name"], json.dumps(c["function"].get("arguments"), sort_keys=True))
        for c in message.get("tool_calls") or ()
    )
    return (message.get("role"), (message.get("content") or "").strip(), calls, message.get("name"))


def split_at_divergence(
    chosen: list[dict[str, Any]], rejected: list[dict[str, Any]]
) -> tuple[list, list, list] | None:
    """(shared prompt, chosen continuation, rejected continuation), split at the first assistant
    turn where the two conversations differ. When they first differ in a tool result, the split
    moves back to the assistant turn before it. None if they never differ or share no user turn."""
    n = min(len(chosen), len(rejected))
    i = next(
        (k for k in range(n) if _comparable(chosen[k]) != _comparable(rejected[k])),
        n if len(chosen) != len(rejected) else None,
    )
    if i is None:
        return None
    while i > 0 and (
        i >= len(chosen)
        or i >= len(rejected)
        or chosen[i].get("role") != "assistant"
        or rejected[i].get("role") != "assistant"
    ):
        i -= 1
    if not any(m.get("role") == "user" for m in chosen[:i]):
        return None
    if chosen[i].get("role") != "assistant" or rejected[i].get("role") != "assistant":
        return None
    return chosen[:i], chosen[i:], rejected[i:]


def dpo_rows(
    traces: Iterable[Trace],
    grades: Mapping[str, Sequence[Grade]],
    filters: DatasetFilters = DatasetFilters(),
    tasks: Mapping[tuple[str, str], Task] | None = None,
) -> Built:
    """DPO pairs from tasks with both a passing (status ok) and a failing trace (any status),
    split at the first turn where they differ. Best passing traces pair with the lowest-scored
    failing ones first, up to `max_pairs_per_task` per task."""
    sel = _Selection(traces, grades, filters, tasks)
    groups: dict[tuple[str, str], dict[str, list]] = defaultdict(lambda: {"pass": [], "fail": []})
    for t, v in sel.kept:
        if v.passed is None:
            sel.drop("ungraded")
        elif v.passed and filters.exclude_flagged and v.flagged:
            sel.drop("flagged")  # a flagged failure is still a fine rejected example
        elif v.passed and t.status == "ok":
            groups[_task_key(t)]["pass"].append((t, v))
        elif not v.passed:
            groups[_task_key(t)]["fail"].append((t, v))
        else:
            sel.drop(f"status_{t.status}")
    entries = []
    for key in sorted(groups):
        good = sorted(groups[key]["pass"], key=_rank_key)
        bad = sorted(
            groups[key]["fail"], key=lambda x: (x[1].score or 0.0, -trace_tokens(x[0]), x[0].id)
        )
        if not good or not bad:
            sel.excluded["no_pair_for_task"] += len(good) + len(bad)
            continue
        if filters.best_of_n:
            good = good[:1]
        pairs = [(g, b) for g in good for b in bad][: filters.max_pairs_per_task]
        for (gt, gv), (bt, bv) in pairs:
            chosen, tools = training_conversation(gt)
            rejected, _ = training_conversation(bt)
            split = split_at_divergence(chosen, rejected)
            if split is None:
                sel.drop("pair_without_divergence")
                continue
            prompt, c, r = split
            row = {"prompt": prompt, "chosen": c, "rejected": r, "tools": tools}
            meta = {
                "env": gt.env,
                "task_id": gt.task_id,
                "trace_ids": [gt.id, bt.id],
                "grade_ids": gv.grade_ids + bv.grade_ids,
                "label": None,
                "subagent": None,
            }
            entries.append(((*key, gt.id, bt.id), row, meta))
    return _finish("dpo", sel, entries)


def kto_rows(
    traces: Iterable[Trace],
    grades: Mapping[str, Sequence[Grade]],
    filters: DatasetFilters = DatasetFilters(),
    tasks: Mapping[tuple[str, str], Task] | None = None,
) -> Built:
    """One KTO row per graded or thumbed trace: label True when it passes (a human thumb
    overrides the score). A passing trace must have status "ok"; failing ones may have any."""
    if filters.best_of_n:
        raise DatasetError("--best-of-n applies to sft and dpo; KTO uses every graded trace")
    sel = _Selection(traces, grades, filters, tasks)
    entries = []
    for t, v in sel.kept:
        if v.passed is None:
            sel.drop("ungraded")
            continue
        if filters.exclude_flagged and v.flagged:
            sel.drop("flagged")
            continue
        label = bool(v.passed) and (t.status == "ok" or v.human is True)
        messages, tools = training_conversation(t)
        first = next((k for k, m in enumerate(messages) if m.get("role") == "assistant"), None)
        if first is None or first == 0:
            sel.drop("no_llm_call")
            continue
        row = {
            "prompt": messages[:first],
            "completion": messages[first:],
            "label": label,
            "tools": tools,
        }
        meta = {
            "env": t.env,
            "task_id": t.task_id,
            "trace_ids": [t.id],
            "grade_ids": v.grade_ids,
            "label": label,
            "subagent": None,
        }
        entries.append(((*_task_key(t), t.id), row, meta))
    return _finish("kto", sel, entries)


def grpo_rows(
    traces: Iterable[Trace],
    grades: Mapping[str, Sequence[Grade]],
    filters: DatasetFilters = DatasetFilters(),
    tasks: Mapping[tuple[str, str], Task] | None = None,
) -> Built:
    """One GRPO prompt row per task seen in the traces (grades are not needed): the system and
    user messages before the first assistant turn (demos removed), and the task's reference
    answer and grader from `tasks` (keyed by (env, task_id)), else from the trace's metadata
    `task_answer` / `task_grader`. Tasks with neither a task record nor an answer are skipped."""
    sel = _Selection(traces, grades, filters, tasks)
    seen: dict[tuple[str, str], tuple] = {}
    for t, _v in sel.kept:
        if t.task_id is None:
            sel.drop("no_task_id")
            continue
        key = _task_key(t)
        task = _lookup_task(t, tasks)
        if task is None and "task_answer" not in t.metadata and "task_grader" not in t.metadata:
            sel.drop("task_unknown")
            continue
        messages, tools = training_conversation(t)
        first = next((k for k, m in enumerate(messages) if m.get("role") == "assistant"), None)
        prompt = messages if first is None else messages[:first]
        if not any(m.get("role") == "user" for m in prompt):
            sel.drop("no_llm_call")
            continue
        # the earliest trace of a task gives its prompt; later ones add nothing
        cand = ((t.start, t.id), t, task, prompt, tools)
        if key in seen:
            sel.drop("duplicate_task")
            if cand[0] >= seen[key][0]:
                continue
        seen[key] = cand
    entries = []
    for key in sorted(seen):
        _, t, task, prompt, tools = seen[key]
        row = {
            "prompt": prompt,
            "answer": task.answer if task is not None else t.metadata.get("task_answer"),
            "grader": task.grader if task is not None else t.metadata.get("task_grader"),
            "task_id": t.task_id,
            "env": t.env,
            "task_metadata": dict(task.metadata) if task is not None else {},
            "tool_names": [tool["function"]["name"] for tool in tools if "function" in tool],
        }
        meta = {
            "env": t.env,
            "task_id": t.task_id,
            "trace_ids": [t.id],
            "grade_ids": (),
            "label": None,
            "subagent": None,
        }
        entries.append((key, row, meta))
    return _finish("grpo", sel, entries)


BUILDERS = {"sft": sft_rows, "dpo": dpo_rows, "kto": kto_rows, "grpo": grpo_rows}


def build_rows(
    kind: str,
    traces: Iterable[Trace],
    grades: Mapping[str, Sequence[Grade]],
    filters: DatasetFilters = DatasetFilters(),
    tasks: Mapping[tuple[str, str], Task] | None = None,
) -> Built:
    """Rows of `kind` ("sft", "dpo", "kto" or "grpo") from traces with spans and their grades
    (by trace id). `tasks` maps (env, task_id) to the environment's Task."""
    if kind not in BUILDERS:
        raise DatasetError(
            f"unknown dataset kind {kind!r}: choose one of {', '.join(DATASET_KINDS)}"
        )
    return BUILDERS[kind](list(traces), grades, filters, tasks)


# A rewrite of a user's prompt: (prompt, "env:task_id") -> (name of the rewrite, new prompt), or
# None to leave that row alone. The improve job passes agent/envs/perturb.py's perturbations
# (traces/ may not import agent/).
Rewrite = Callable[[str, str], "tuple[str, str] | None"]


def augment_rows(built: Built, rewrite: Rewrite) -> Built:
    """SFT rows plus one copy of each orchestrator row whose first user turn `rewrite` changes,
    placed right after its original; the copy's `row_info` names the rewrite under `augment`.
    Subagent rows keep their one form: their prompts come from the orchestrator, not a user."""
    if built.kind != "sft":
        raise DatasetError(f"augmenting prompts applies to SFT rows, not {built.kind}")
    rows: list[dict[str, Any]] = []
    info: list[dict[str, Any]] = []
    for row, meta in zip(built.rows, built.row_info, strict=True):
        rows.append(row)
        info.append(meta)
        if meta["subagent"] is not None:
            continue
        first = next((i for i, m in enumerate(row["messages"]) if m.get("role") == "user"), None)
        content = row["messages"][first].get("content") if first is not None else None
        if not isinstance(content, str):
            continue
        new = rewrite(content, f"{meta['env'] or ''}:{meta['task_id']}")
        if new is None or new[1] == content:
            continue
        messages = [dict(m) for m in row["messages"]]
        messages[first]["content"] = new[1]
        rows.append({**row, "messages": messages})
        info.append({**meta, "augment": new[0]})
    return Built(built.kind, rows, info, built.trace_ids, built.grade_ids, built.excluded)


# --- writing ---------------------------------------------------------------------------------


def to_openai_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Our message dicts in the OpenAI fine-tuning shape: tool-call arguments as JSON strings,
    tool-call-only assistant turns with null content, tool messages without `name`."""
    out = []
    for m in messages:
        o: dict[str, Any] = {"role": m["role"], "content": m.get("content") or ""}
        if m.get("tool_calls"):
            o["tool_calls"] = [
                {
                    "id": c.get("id") or f"call_{i}",
                    "type": "function",
                    "function": {
                        "name": c["function"]["name"],
                        "arguments": json.dumps(
                            c["function"].get("arguments") or {}, ensure_ascii=False
                        ),
                    },
                }
                for i, c in enumerate(m["tool_calls"])
            ]
            if not o["content"]:
                o["content"] = None
        if m["role"] == "tool":
            o["tool_call_id"] = m.get("tool_call_id") or ""
        out.append(o)
    return out


def openai_rows(built: Built) -> list[dict[str, Any]]:
    """The rows as OpenAI fine-tuning JSONL: SFT as `{"messages", "tools"}`, DPO as
    `{"input": {"messages", "tools"}, "preferred_output", "non_preferred_output"}`."""
    if built.kind == "sft":
        return [
            {"messages": to_openai_messages(r["messages"]), "tools": r["tools"]} for r in built.rows
        ]
    if built.kind == "dpo":
        return [
            {
                "input": {"messages": to_openai_messages(r["prompt"]), "tools": r["tools"]},
                "preferred_output": to_openai_messages(r["chosen"]),
                "non_preferred_output": to_openai_messages(r["rejected"]),
            }
            for r in built.rows
        ]
    raise DatasetError(
        f"OpenAI fine-tuning has no {built.kind.upper()} format: use --format trl for "
        f"{built.kind} (openai works for sft and dpo)"
    )


def _jsonl(rows: Iterable[dict[str, Any]]) -> bytes:
    # key order is kept on purpose: a tool schema's property order is what the model saw
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _counts(built: Built) -> dict[str, Any]:
    by_env = Counter(i["env"] or "(none)" for i in built.row_info)
    counts: dict[str, Any] = {"by_env": dict(sorted(by_env.items()))}
    if built.kind == "kto":
        by_label = Counter(str(i["label"]).lower() for i in built.row_info)
        counts["by_label"] = dict(sorted(by_label.items()))
    if built.kind == "sft":
        by_agent = Counter(i["subagent"] or "orchestrator" for i in built.row_info)
        counts["by_agent"] = dict(sorted(by_agent.items()))
        augmented = Counter(i["augment"] for i in built.row_info if i.get("augment"))
        if augmented:
            counts["augmented"] = dict(sorted(augmented.items()))
    counts["tasks"] = len({(i["env"], i["task_id"]) for i in built.row_info})
    counts["by_source"] = dict(
        sorted(Counter(i.get("source", "self") for i in built.row_info).items())
    )
    return counts


def manifest_for(
    built: Built, filters: DatasetFilters, files: Mapping[str, bytes]
) -> dict[str, Any]:
    """The manifest: kind, filters as given, trace and grade ids, counts, file hashes and a
    content hash over the row files. Holds no time, so equal inputs give an equal manifest."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name])
    return {
        "schema_version": DATASET_SCHEMA_VERSION,
        "kind": built.kind,
        "rows": len(built.rows),
        "filters": asdict(filters),
        "counts": _counts(built),
        "excluded": built.excluded,
        "trace_ids": built.trace_ids,
        "grade_ids": built.grade_ids,
        "files": {name: _sha256(data) for name, data in sorted(files.items())},
        "content_hash": digest.hexdigest(),
        "teacher_rows": sum(i.get("source") == "teacher" for i in built.row_info),
        # each row's task, so that a trainer can see a dataset dominated by one (tuner/sanity.py)
        "row_sources": [
            {
                "trace_ids": i["trace_ids"],
                "subagent": i["subagent"],
                "label": i["label"],
                "env": i["env"],
                "task_id": i["task_id"],
                **({"augment": i["augment"]} if i.get("augment") else {}),
                "source": i.get("source", "self"),
            }
            for i in built.row_info
        ],
    }


def summary_for(manifest: dict[str, Any]) -> str:
    """A short SUMMARY.md a person reads before training on the folder."""
    f = manifest["filters"]
    shown = ", ".join(f"{k}={v}" for k, v in f.items() if v not in (None, False)) or "none"
    lines = [
        f"# {manifest['kind'].upper()} dataset",
        "",
        f"- rows: {manifest['rows']} from {len(manifest['trace_ids'])} traces, "
        f"{manifest['counts']['tasks']} tasks",
        f"- filters: {shown}",
        f"- content hash: `{manifest['content_hash'][:16]}`",
        "",
        "| count | value |",
        "|---|---|",
    ]
    for group, values in manifest["counts"].items():
        if isinstance(values, dict):
            lines += [f"| {group} {k} | {v} |" for k, v in values.items()]
    if manifest["excluded"]:
        lines += ["", "Traces left out:", ""]
        lines += [f"- {reason}: {n}" for reason, n in manifest["excluded"].items()]
    files = ", ".join(f"`{n}`" for n in manifest["files"])
    lines += ["", f'Files: {files}. Load with `datasets.load_dataset("json", data_files=...)`.', ""]
    return "\n".join(lines)


def write_dataset(
    built: Built,
    out: str | Path,
    filters: DatasetFilters = DatasetFilters(),
    formats: Sequence[str] = ("trl",),
    scrub_patterns: Sequence[str] = (),
) -> DatasetResult:
    """Scrub the rows and write `out/` (train.jsonl, manifest.json, SUMMARY.md, openai.jsonl if
    asked) through a temporary folder renamed into place. An existing dataset folder at `out`
    is replaced; any other existing non-empty folder is refused."""
    from traces.scrub import scrub_value

    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise DatasetError(f"unknown format {bad[0]!r}: choose from {', '.join(FORMATS)}")
    out = Path(out).expanduser().resolve()
    if out.exists() and (
        not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_FILE).is_file())
    ):
        raise DatasetError(
            f"{out} exists and is not a selftune dataset folder: choose another --out or remove it"
        )
    rows = [scrub_value(r, scrub_patterns) for r in built.rows]
    scrubbed = Built(
        built.kind, rows, built.row_info, built.trace_ids, built.grade_ids, built.excluded
    )
    files = {TRAIN_FILE: _jsonl(rows)}
    if "openai" in formats:
        files[OPENAI_FILE] = _jsonl(openai_rows(scrubbed))
    manifest = manifest_for(scrubbed, filters, files)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    (tmp / SUMMARY_FILE).write_text(summary_for(manifest), encoding="utf-8")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return DatasetResult(out, manifest)


def build_dataset(
    store: Any,
    kind: str,
    out: str | Path,
    filters: DatasetFilters = DatasetFilters(),
    *,
    formats: Sequence[str] = ("trl",),
    tasks: Mapping[tuple[str, str], Task] | None = None,
    scrub_patterns: Sequence[str] = (),
    augment: Rewrite | None = None,
) -> DatasetResult:
    """Build a `kind` dataset from the traces in `store` (a `traces.store.TraceStore`) that
    match `filters`, and write it to `out`. Raises DatasetError when no row qualifies, saying
    why the traces were left out. `augment` (SFT only) adds a rewritten copy of each row's user
    prompt (`augment_rows`)."""
    if kind not in BUILDERS:
        raise DatasetError(
            f"unknown dataset kind {kind!r}: choose one of {', '.join(DATASET_KINDS)}"
        )
    since = None if filters.since is None else parse_time(filters.since)
    q = TraceQuery(env=filters.env, since=since, limit=None)
    traces = store.query(q, with_spans=True)
    grades = {t.id: store.grades(t.id) for t in traces}
    built = build_rows(kind, traces, grades, filters, tasks)
    if not built.rows:
        why = ", ".join(f"{r}: {n}" for r, n in built.excluded.items()) or "no traces matched"
        where = f" of environment {filters.env!r}" if filters.env else ""
        fix = "run and grade more episodes, or loosen --min-score / --since / --grader"
        if built.excluded.get("test_split") and len(traces) == built.excluded["test_split"]:
            # `eval` plays the test split, which is held out from training on purpose
            fix = (
                "every trace is from the held-out test split (what `selftune eval` plays), which "
                "is never trained on: collect on the train split with `selftune collect ENV` "
                "(or `selftune eval ENV --split train`)"
            )
        raise DatasetError(f"no {kind} rows from {len(traces)} traces{where} ({why}): {fix}")
    if augment is not None:
        built = augment_rows(built, augment)
    return write_dataset(built, out, filters, formats, scrub_patterns)
