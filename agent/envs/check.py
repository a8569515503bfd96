"""Reward integrity: does an environment's grader reward the right answers, and only those?

`selftune check ENV` (and the start of every `improve`) grades four kinds of made-up answer
on every task that has a reference:

- the reference answer itself must score 1;
- an empty answer, a constant answer and the task's own prompt echoed back must score 0.

A grader that fails this trains the model on noise or teaches it to game the grade (a grader
that finds "a number from the question" in an echoed prompt is the classic case), so it is
found before any collection or training is paid for. Tasks graded by the LLM judge have no
reference to check and are counted as skipped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from agent.envs import Environment
from traces.read import normalize_text
from traces.schemas import Task, Trace

CONSTANT_ANSWER = "I don't know."
# (probe, what the grader must give it): the reference passes, the rest fail
PROBES = {"reference": 1.0, "empty": 0.0, "constant": 0.0, "echo": 0.0}


@dataclass
class ProbeFailure:
    task_id: str
    probe: str
    answer: str
    score: float
    expected: float


@dataclass
class CheckReport:
    env: str
    tasks: int = 0  # tasks checked
    skipped: int = 0  # tasks with no reference, or graded by the judge
    failures: list[ProbeFailure] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.tasks > 0 and not self.failures

    def failed_share(self) -> float:
        """The share of checked tasks that failed at least one probe."""
        return len({f.task_id for f in self.failures}) / max(self.tasks, 1)

    def blocks_training(self, max_share: float = 0.05) -> bool:
        """Too broken to train on: no checkable task, or more than `max_share` of the tasks
        fail a probe (one echo that happens to contain the answer is a warning, not a stop)."""
        return self.tasks == 0 or self.failed_share() > max_share

    def by_probe(self) -> dict[str, int]:
        """How many tasks failed each probe."""
        counts = Counter(f.probe for f in self.failures)
        return {p: counts.get(p, 0) for p in PROBES}

    def summary(self) -> str:
        if self.tasks == 0:
            return (
                f"{self.env}: no task has a reference answer a rule grader can check "
                f"({self.skipped} skipped): give tasks an 'answer'"
            )
        if not self.failures:
            return f"{self.env}: the grader passed every probe on {self.tasks} tasks"
        worst = ", ".join(f"{p} {n}" for p, n in self.by_probe().items() if n)
        first = self.failures[0]
        return (
            f"{self.env}: the grader failed {len(self.failures)} probes on {self.tasks} tasks "
            f"({worst}); e.g. task {first.task_id}: the {first.probe} answer "
            f"{first.answer[:60]!r} scored {first.score:g}, expected {first.expected:g}. "
            "Fix the tasks' answers or the grader (environment.py's grade) before training on it"
        )


def probe_answers(task: Task) -> dict[str, str]:
    """The made-up answers for one task; a probe that equals the reference is left out."""
    reference = str(task.answer)
    answers = {
        "reference": reference,
        "empty": "",
        "constant": CONSTANT_ANSWER,
        "echo": task.prompt,
    }
    same = normalize_text(reference)
    return {k: v for k, v in answers.items() if k == "reference" or normalize_text(v) != same}


def _answer_trace(env: str, task: Task, answer: str) -> Trace:
    # a finished episode whose final answer is `answer` and that made no calls
    return Trace(env=env, task_id=task.id, status="ok", answer=answer, end=0.0)


async def check_environment(environment: Environment, limit: int | None = None) -> CheckReport:
    """Grade the probe answers of every task with a reference (at most `limit` tasks)."""
    report = CheckReport(env=environment.name)
    for task in environment.tasks:
        if limit is not None and report.tasks >= limit:
            break
        grader = task.grader or environment.grader
        if task.answer is None or grader == "judge":
            report.skipped += 1
            continue
        report.tasks += 1
        for probe, answer in probe_answers(task).items():
            grade = await environment.agrade(task, _answer_trace(environment.name, task, answer))
            expected = PROBES[probe]
            if abs(grade.value - expected) > 1e-9 or grade.metadata.get("error"):
                report.failures.append(ProbeFailure(task.id, probe, answer, grade.value, expected))
    return report
