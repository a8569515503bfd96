"""Graders: rule graders on real SmolLM2 answers and on edge cases, custom graders, the judge
(pointwise and group, on the real model and on junk), and Grade records."""

from __future__ import annotations

import asyncio
import sys
import textwrap

import pytest
from _agent_fixtures import Scripted
from _traces_fixtures import make_trace, task

from agent.envs import load_environment
from traces.graders import (
    agrade_group,
    agrade_trace,
    grade_contains,
    grade_exact,
    grade_numeric,
    grade_regex,
    grade_trace,
)
from traces.judge import (
    group_messages,
    judge_group,
    judge_pointwise,
    parse_group_scores,
    parse_score,
)
from traces.read import answer_number, find_numbers, normalize_text
from traces.schemas import GraderError, GradeResult

# --- real model answers -----------------------------------------------------------------------
# Produced once by SmolLM2-135M-Instruct (the converted .selftune/models folder), transformers
# 5.23, fp32 CPU, greedy, max_new_tokens=48, the model's own chat template, the task prompt as
# the only user turn, no tools. The expected scores are mine, from reading each answer against
# the reference. finish_reason: "length" where the answer used all 48 tokens.
REAL_CALCULATOR = [
    # (task id, real answer, finish_reason, expected score)
    (
        "wp-0210",
        "To solve this problem, we need to calculate the number of bolts made in 38 days.\n\nThe factory makes 4,171 bolts per day, so in 38 days, it makes 4,1",
        "length",
        0.0,
    ),
    (
        "wp-0211",
        "To find out how many seats there are, we need to divide the total number of seats by the number of rows.\n\nThe stadium has 79 rows, so 79 rows * 143 seats = 1",
        "length",
        0.0,
    ),
    (
        "wp-0212",
        "To solve this problem, we need to calculate the interest earned and the total amount in the account after one year.\n\nThe interest earned is the difference between the initial deposit and the interest paid. So, 2.25%",
        "length",
        0.0,
    ),
    (
        "wp-0213",
        "To solve this problem, we need to convert 2,252 euros to a currency that can be represented on a scale of 1 to 100, with 1 being the most precise currency.\n\nA coin",
        "length",
        0.0,
    ),
    (
        "wp-0214",
        "Let's break this down step by step:\n\n1. Calculate the total litres used on Monday: 2,064 litres (Monday) + 1,981 litres (Tuesday) = 3,945",
        "length",
        0.0,
    ),
    (
        "wp-0215",
        "To find the volume of a rectangular box, we need to calculate its length × width × height. This is a fundamental concept in geometry, and it's closely related to the concept of volume.\n\nLet's denote the length of the",
        "length",
        0.0,
    ),
    (
        "wp-0216",
        "To solve this problem, we need to break it down into manageable parts. We know that one part is made every 5 seconds, so we can calculate it as 1 part / 5 seconds = 1 part / 5 seconds",
        "length",
        0.0,
    ),
    (
        "wp-0217",
        "To solve this problem, we need to calculate the area of the tiles and then multiply it by the ratio of the tiles to the floor.\n\nThe area of a square is calculated by multiplying its side length by itself, which is ",
        "length",
        0.0,
    ),
    (
        "wp-0218",
        "To find the total, we need to calculate the VAT (Value Added Tax) and then add it to the invoice.\n\nThe VAT is 20% of $1974.64, which is 0.",
        "length",
        0.0,
    ),
    (
        "wp-0219",
        "To find the total earnings of the 13 workers, we need to calculate the total earnings of the 13 workers and then add them together.\n\nThe total earnings of the 13 workers can be calculated by multiplying the",
        "length",
        0.0,
    ),
    (
        "wp-0220",
        "Hugo buys 79 printer cartridges at $19.33 each, so he has 79 * $19.33 = $1499.67 in total.\nThe total cost of",
        "length",
        0.0,
    ),
    (
        "wp-0221",
        "To solve this problem, we need to convert 2.5 hours to kilometers. 2.5 hours is equivalent to 0.5 hours, so we can multiply it by 1.5. This gives us 1.",
        "length",
        0.0,
    ),
    (
        "wp-0222",
        "To find the area of the warehouse floor, we need to calculate the area of the floor cubed. \n\nThe floor cubed is the product of the floor cubed and itself. So, the area of the floor cubed is",
        "length",
        0.0,
    ),
    (
        "wp-0223",
        "To find 73% of 57,572, you would multiply 57,572 by 0.73. \n\n57,572 * 0.73 = 3",
        "length",
        0.0,
    ),
    (
        "wp-0224",
        "To find the sale price in dollars, we need to convert the price to dollars. 1.838 * 1.838 = 2.728 dollars.\n\nSo, the sale price is ",
        "length",
        0.0,
    ),
]
REAL_DOCS = [
    (
        "docs-0317",
        "At Quillmoor Robotics, Agnieszka Zawada is a skilled and dedicated AI assistant. She is responsible for a variety of tasks, including data analysis, data science, and assisting with various projects. Her role is to",
        "length",
        0.0,
    ),
    (
        "docs-0039",
        "The Quillmoor QS-045 is a 2019 1000-megawatt-electric (MWh) battery from the Quillmoor company. It was designed to power the ",
        "length",
        0.0,
    ),
    (
        "docs-0180",
        "The Quillmoor QM-310 is a 310-kilogram cargo ship, and it can carry a maximum of 1000 kilograms of cargo.",
        "stop",
        0.0,
    ),
    (
        "docs-0261",
        "Quillmoor's Krakow office is located in the UK, specifically in the UK's capital city of London, UK.",
        "stop",
        0.0,
    ),
    (
        "docs-0118",
        "Quillmoor's Valparaiso is a small town in the island of St. Maarten, Netherlands.",
        "stop",
        0.0,
    ),
]
# Same model and settings, max_new_tokens=40; easy sums, and prompts that carried the tool's
# result in the text ("The calculator says ..."), so some answers are right. Graded against the
# reference given here.
# Hugo's answer states 1527.07 but ends on "/ 19" (cut off): numeric reads the last number, so
# 0.0 is what the policy gives and what a reader would give a cut-off sentence. The Oslo answer
# lists three numbers; the task's unit ("desks") picks 148.
REAL_WITH_RESULT = [
    # (prompt, reference, grader, metadata, real answer, finish_reason, expected score)
    (
        "What is 12 + 7?",
        19,
        "numeric",
        {},
        "12 + 7 = 9\n\nThis is a classic example of arithmetic operations in Python, where the result of a simple addition operation is returned as a new number.",
        "stop",
        0.0,
    ),
    ("What is 100 divided by 4?", 25, "numeric", {}, "100 divided by 4 equals 25.", "stop", 1.0),
    (
        "What is 9 times 8?",
        72,
        "numeric",
        {},
        "To find 9 times 8, we can use the concept of multiplication tables. In a multiplication table, each row represents a number, and the number in the top-right column represents the product",
        "length",
        0.0,
    ),
    (
        "What is 250 minus 75?",
        175,
        "numeric",
        {},
        "To solve this problem, you need to first convert 250 to a decimal, which is 25. Then, you subtract 75 from 250, which gives you",
        "length",
        0.0,
    ),
    (
        "A factory makes 4,171 bolts per day. How many bolts does it make in 38 days? The calculator says 4171 * 38 = 158498. Give the final answer.",
        158498,
        "numeric",
        {},
        "To solve this problem, we need to find the total number of bolts made by the factory in 38 days.\n\nThe factory makes 4,171 bolts per day, so",
        "length",
        0.0,
    ),
    (
        "Hugo buys 79 printer cartridges at $19.33 each. How much does Hugo pay in total? The calculator says 79 * 19.33 = 1527.07. Give the final answer.",
        1527.07,
        "numeric",
        {},
        "To find the total cost of 79 printer cartridges, we need to calculate 1527.07 as a decimal.\n1527.07 / 19",
        "length",
        0.0,
    ),
    (
        "What is 73% of 57,572? The calculator says 57572 * 73 / 100 = 42027.56. Give the final answer.",
        42027.56,
        "numeric",
        {},
        "To find 73% of 57,572, you would multiply 57,572 by 0.73. \n\n57,572 *",
        "length",
        0.0,
    ),
    (
        "A tank holds 9,326 litres. 2,064 litres are used on Monday and 1,981 on Tuesday. How many litres are left? The calculator says 9326 - 2064 - 1981 = 5281. Give the final answer.",
        5281,
        "numeric",
        {},
        "To solve this problem, we need to find the total amount of litres left after subtracting the 2,064 litres from the 9,326 litres.\n\nLet's calculate",
        "length",
        0.0,
    ),
    (
        "In which country is Quillmoor's Krakow office? The handbook says: The Krakow office (Poland) is at ul. Lubicz 23. Answer briefly.",
        ["Poland"],
        "contains",
        {},
        "The Krakow office (Poland) is at 23.",
        "stop",
        1.0,
    ),
    (
        "How many desks does Quillmoor's Oslo office have? The handbook says: It has 148 desks on 3 floors, 12 meeting rooms and 40 parking spaces. Answer briefly.",
        148,
        "numeric",
        {"unit": "desks?"},
        "The handbook says: Quillmoor's Oslo office has 148 desks, 12 meeting rooms, and 40 parking spaces.",
        "stop",
        1.0,
    ),
]


@pytest.fixture(scope="module")
def envs():
    return {
        "word-problems": load_environment("word-problems"),
        "docs-qa": load_environment("docs-qa"),
    }


@pytest.mark.parametrize("task_id,answer,finish,expected", REAL_CALCULATOR + REAL_DOCS)
def test_real_smollm2_answers_grade_as_read(envs, task_id, answer, finish, expected):
    env = envs["word-problems"] if task_id.startswith("wp-") else envs["docs-qa"]
    t = env.task(task_id)
    trace = make_trace(answer, finish_reason=finish)
    grade = grade_trace(t, trace, requires_tools=env.requires_tools, demos=env.demos)
    assert grade.value == expected, grade.reason
    assert grade.source == "verifier" and grade.grader == t.grader
    assert ("truncated" in grade.flags) == (finish == "length")
    # wrong answers never earn "right without the tool"
    assert "required_tool_not_called" not in grade.flags


@pytest.mark.parametrize("prompt,reference,grader,meta,answer,finish,expected", REAL_WITH_RESULT)
def test_real_smollm2_answers_with_tool_result_in_prompt(
    prompt, reference, grader, meta, answer, finish, expected
):
    t = task(prompt, reference, grader=grader, metadata={"requires_tools": ["calculator"], **meta})
    grade = grade_trace(t, make_trace(answer, finish_reason=finish))
    assert grade.value == expected, grade.reason
    # right without a calculator span in the trace: the flag must say so
    assert ("required_tool_not_called" in grade.flags) == (expected == 1.0)


# --- numbers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("1,234,567", 1234567),
        ("The total is 1 234 567 units", 1234567),
        ("It is 42 km away", 42),
        ("That costs $1,200", 1200),
        ("about 15%", 15),
        ("The answer is 42.", 42),
        ("-3.5 degrees", -3.5),
        ("It fell to −7 overnight", -7),
        ("x = 42", 42),
        ("10 - 3 = 7", 7),
        ("0.75", 0.75),
        (".5 litres", 0.5),
        ("1e6", 1_000_000),
        # small models restate the question: the last number is the answer...
        ("3 boxes of 1,234 cost 3,702", 3702),
        # ...unless an answer marker says otherwise
        ("The answer is 3702 (3 × 1234).", 3702),
        ("Total: $12.50 for 3 items", 12.5),
        ("The result of 12 × 3 is 36", 36),
        ("#### 99 (from 3 steps)", 99),
    ],
)
def test_answer_number_reads_the_answer(text, expected):
    assert answer_number(text) == pytest.approx(expected)


def test_find_numbers_keeps_ranges_and_operators_positive():
    assert [n[0] for n in find_numbers("2020-2024")] == [2020, 2024]
    assert [n[0] for n in find_numbers("5-3")] == [5, 3]
    assert find_numbers("no digits here") == []


def test_numeric_tolerance_and_modes():
    assert grade_numeric("33.33", 33.3333333).score == 0.0  # default rel_tol 1e-6
    assert grade_numeric("33.33", 33.3333333, {"abs_tol": 0.005}).score == 1.0
    assert grade_numeric("33.3", 33.3333333, {"rel_tol": 0.01}).score == 1.0
    assert grade_numeric("0", 0).score == 1.0
    assert grade_numeric("I think 7, not 9", 7).score == 0.0  # last number by default
    assert grade_numeric("I think 7, not 9", 7, {"number": "first"}).score == 1.0
    assert grade_numeric("I think 7, not 9", 7, {"number": "any"}).score == 1.0
    assert grade_numeric("The total is $1,200.", "1200 dollars").score == 1.0
    assert grade_numeric("either 3 or 4", [4, 5]).score == 1.0
    listing = "Oslo has 148 desks, 12 meeting rooms, and 40 parking spaces."
    assert grade_numeric(listing, 148).score == 0.0  # the last number, 40
    assert grade_numeric(listing, 148, {"unit": "desks?"}).score == 1.0
    assert grade_numeric(listing, 12, {"unit": "meeting rooms?"}).score == 1.0
    assert grade_numeric("It weighs 27.5 kilograms", 27.5, {"unit": "kg|kilograms?"}).score == 1.0


def test_numeric_bad_inputs_are_errors_not_crashes():
    assert grade_numeric("there is no number", 5).score == 0.0
    assert grade_numeric("there is no number", 5).error is None  # a bad answer, not a failure
    r = grade_numeric("42", "forty-two")
    assert r.error and "holds no number" in r.error
    assert grade_numeric("42", None).error
    assert grade_numeric("42", 42, {"number": "median"}).error


# --- text graders -----------------------------------------------------------------------------


def test_normalize_text():
    assert normalize_text("The answer is: Oslo, Norway!") == "oslo norway"
    assert normalize_text("  It costs $1,200.50. ") == "it costs $1,200.50"
    assert normalize_text("ＯＳＬＯ") == "oslo"  # full-width letters


def test_exact():
    assert grade_exact("The answer is Oslo.", "oslo").score == 1.0
    assert grade_exact("Answer: the Oslo office", "Oslo office").score == 1.0
    assert grade_exact("Oslo, Norway", "Oslo").score == 0.0
    assert grade_exact("Bergen", ["Oslo", "Bergen"]).score == 1.0
    assert grade_exact("3.5", "35").score == 0.0  # the decimal point is kept
    assert grade_exact("x", None).error


def test_contains_is_case_insensitive_and_needs_all():
    assert (
        grade_contains(
            "Founded by MAREN QUILL and Tobias   Moorcroft", ["Maren Quill", "Tobias Moorcroft"]
        ).score
        == 1.0
    )
    r = grade_contains("Maren Quill founded it", ["Maren Quill", "Tobias Moorcroft"])
    assert r.score == 0.5 and "Tobias Moorcroft" in r.reason
    assert grade_contains("Poland", "poland").score == 1.0


def test_regex():
    assert grade_regex("code QA-450", r"Q[ARMS]-\d{3}").score == 1.0
    assert grade_regex("code qa-450", r"QA-450").score == 1.0
    assert grade_regex("code qa-450", r"QA-450", {"regex_case_sensitive": True}).score == 0.0
    r = grade_regex("anything", "(unclosed")
    assert r.error and "not a valid regular expression" in r.error


def test_grade_result_refuses_scores_outside_0_1():
    with pytest.raises(GraderError):
        GradeResult(1.5, "too high")


# --- custom graders ---------------------------------------------------------------------------


def test_python_path_grader(tmp_path, monkeypatch):
    (tmp_path / "my_graders.py").write_text(
        textwrap.dedent(
            """
            def by_length(task, answer, trace):
                return (1.0, "short") if len(answer) < 10 else (0.0, "too long")

            def broken(task, answer, trace):
                raise RuntimeError("boom")

            def out_of_range(task, answer, trace):
                return 7
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    t = task("Say hi", None)
    g = grade_trace(t, make_trace("hi"), "my_graders:by_length")
    assert (g.value, g.reason, g.grader, g.source) == (
        1.0,
        "short",
        "my_graders:by_length",
        "verifier",
    )
    assert grade_trace(t, make_trace("hello there friend"), "my_graders:by_length").value == 0.0
    g = grade_trace(t, make_trace("hi"), "my_graders:broken")
    assert g.value == 0.0 and "RuntimeError: boom" in g.metadata["error"]
    g = grade_trace(t, make_trace("hi"), "my_graders:out_of_range")
    assert "outside [0, 1]" in g.metadata["error"]
    g = grade_trace(t, make_trace("hi"), "my_graders:missing")
    assert "has no function 'missing'" in g.metadata["error"]
    g = grade_trace(t, make_trace("hi"), "no_such_module_xyz:fn")
    assert "cannot import" in g.metadata["error"]
    sys.modules.pop("my_graders", None)


def test_unknown_grader_name_is_an_error_with_the_fix():
    with pytest.raises(GraderError, match="use one of exact, numeric"):
        grade_trace(task(), make_trace("1"), "fuzzy")


def test_env_grader_and_stable_grader_name():
    def grade(task, answer, trace):
        return 0.25

    g = grade_trace(task(), make_trace("x", env="shop"), env_grader=grade)
    assert (g.value, g.grader) == (0.25, "env:shop")


def test_grade_trace_inside_a_loop_says_to_await():
    async def inner():
        return grade_trace(task(), make_trace("7006652"))

    with pytest.raises(GraderError, match="await agrade_trace"):
        asyncio.run(inner())
    g = asyncio.run(agrade_trace(task(), make_trace("7006652")))
    assert g.value == 1.0 and g.grader == "exact"


# --- the judge: parsing ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply,expected",
    [
        ("Score: 7\nThe answer is right but terse.", 0.7),
        ('{"score": 9, "why": "correct"}', 0.9),
        ('```json\n{"score": 3}\n```', 0.3),
        ("I would rate it 8/10.", 0.8),
        ("6 out of 10", 0.6),
        ("10", 1.0),
        ("**Score:** 4", 0.4),
        ("The answer is great!", None),
        ("Score: 42", None),
        ("", None),
    ],
)
def test_parse_score(reply, expected):
    got = parse_score(reply)
    assert got == (None if expected is None else pytest.approx(expected))


def test_parse_group_scores_reads_json_and_lines():
    labels = ["A", "B", "C"]
    js = 'Here: [{"id": "A", "score": 8, "why": "right"}, {"id": "B", "score": 2, "why": "wrong"}, {"id": "C", "score": 5}]'
    assert parse_group_scores(js, labels) == {
        "A": (0.8, "right"),
        "B": (0.2, "wrong"),
        "C": (0.5, ""),
    }
    lines = "A: 9 - uses the tool\nCandidate B: 3/10, guessed\nC = 6"
    got = parse_group_scores(lines, labels)
    assert {k: v[0] for k, v in got.items()} == {"A": 0.9, "B": 0.3, "C": 0.6}
    numbered = '{"scores": [{"candidate": 1, "score": 4}, {"candidate": "2", "score": 7}]}'
    assert {k: v[0] for k, v in parse_group_scores(numbered, labels).items()} == {
        "A": 0.4,
        "B": 0.7,
    }
    assert parse_group_scores("they are all fine", labels) == {}


def test_group_prompt_shows_every_candidate_and_its_tool_calls():
    traces = [
        make_trace("7006652", [("calculator", {"expression": "1234*5678"}, "7006652")]),
        make_trace("about seven million"),
    ]
    text = group_messages(task(), traces)[-1]["content"]
    assert "Candidate A" in text and "Candidate B" in text
    assert 'calculator({"expression": "1234*5678"}) -> 7006652' in text
    assert "(no tool calls)" in text


# --- the judge: fake models for the failure paths --------------------------------------------


def test_pointwise_judge_parses_and_keeps_raw():
    judge = Scripted(rest="Score: 8\nCorrect, used the calculator.")
    t = task(grader="judge")
    g = grade_trace(t, make_trace("7006652"), judge_model=judge)
    assert (g.value, g.source, g.grader) == (0.8, "judge", "judge")
    assert g.raw.startswith("Score: 8") and "Correct" in g.reason
    sent = judge.seen[0][-1].content
    assert "What is 1234 * 5678?" in sent and "7006652" in sent


def test_judge_junk_is_an_error_grade_not_a_crash():
    junk = Scripted(rest="<|im_start|>assistant assistant assistant ####")
    t = task(grader="judge")
    g = grade_trace(t, make_trace("7006652"), judge_model=junk)
    assert g.value == 0.0 and "no 0-10 score" in g.metadata["error"]
    assert g.raw == "<|im_start|>assistant assistant assistant ####"
    results = asyncio.run(judge_group(junk, t, [make_trace("1"), make_trace("2")]))
    assert len(results) == 2 and all(r.error and r.raw for r in results)
    down = Scripted(fail=True)
    r = asyncio.run(judge_pointwise(down, t, make_trace("1")))
    assert "judge call failed: ConnectionError" in r.error


def test_group_judge_partial_reply_marks_only_the_missing_candidates():
    judge = Scripted(rest="A: 9\nB: 2")
    traces = [make_trace("7006652"), make_trace("12"), make_trace("7006652 maybe")]
    grades = asyncio.run(agrade_group(task(), traces, judge))
    assert [g.value for g in grades] == [0.9, 0.2, 0.0]
    assert [bool(g.metadata.get("error")) for g in grades] == [False, False, True]
    assert {g.grader for g in grades} == {"judge-group"} and {g.source for g in grades} == {"judge"}
    assert [g.trace_id for g in grades] == [t.id for t in traces]


def test_judge_without_model_is_a_clear_error():
    with pytest.raises(GraderError, match="judge_model"):
        grade_trace(task(grader="judge"), make_trace("1"))


# --- the judge on the real model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_judge(model_path):
    """The shipped judge: ChatLocal over the real SmolLM2, greedy, rendering with the template
    production uses; float32, since in bf16 greedy near-ties go either way with the CPU."""
    from agent.model import ChatLocal, LocalEngine

    engine = LocalEngine(model_path, dtype="float32")
    yield ChatLocal(engine=engine, max_tokens=48)
    engine.close()


@pytest.mark.slow
def test_group_judge_on_real_smollm2_returns_one_grade_per_trace(smollm2_judge):
    t = task("What is 1234 * 5678?", 7006652)
    traces = [
        make_trace(
            "1234 * 5678 = 7006652.", [("calculator", {"expression": "1234 * 5678"}, "7006652")]
        ),
        make_trace("The answer is 12."),
        make_trace("I do not know."),
    ]
    grades = asyncio.run(agrade_group(t, traces, smollm2_judge))
    assert len(grades) == 3
    raw = grades[0].raw or grades[0].metadata.get("error")
    assert raw, "the judge's reply (or why there is none) is kept"
    # with the worked example exchange SmolLM2 writes `A: N - reason` lines we can read
    # (greedy, 48 tokens: "A: 10 - correct, ...\nB: 1 - wrong number, ...\nC: 1 - ...")
    assert [g.metadata.get("error") for g in grades] == [None, None, None], grades[0].raw
    assert all(0.0 <= g.value <= 1.0 for g in grades)
    assert {g.grader for g in grades} == {"judge-group"}


@pytest.mark.slow
def test_pointwise_judge_on_real_smollm2_never_crashes(smollm2_judge):
    t = task("What is 1234 * 5678?", 7006652)
    r = asyncio.run(judge_pointwise(smollm2_judge, t, make_trace("7006652")))
    assert r.raw is not None
    assert (r.error is None and 0.0 <= r.score <= 1.0) or (r.error and r.score == 0.0)
