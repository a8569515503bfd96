"""Running suites and human feedback with real parts: the real model through the CLI, a
user's own environment folder run by path, and `selftune review` in a pseudo-terminal."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pexpect
import pytest

from agent.agent import Agent
from agent.envs.run import run_suite, wilson_interval
from traces.schemas import TraceQuery
from traces.store import TraceStore
from traces.tracer import Tracer

SELFTUNE = str(Path(sys.executable).parent / "selftune")


@pytest.mark.slow
def test_eval_calculator_on_the_real_model_prints_a_rate_and_grades_every_trace(cfg, cli_env):
    run = subprocess.run(
        [SELFTUNE, "eval", "calculator", "--limit", "8", "--concurrency", "4", "--json"],
        env=cli_env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert result["n"] == 8 and result["env"] == "calculator" and result["split"] == "test"
    assert 0.0 <= result["success_rate"] <= 1.0
    assert result["ci95"] == list(wilson_interval(result["successes"], 8))
    store = TraceStore(cfg.workspace.traces_db)
    traces = store.query(TraceQuery(tag=f"run:{result['run_id']}", limit=None))
    assert len(traces) == 8 and {t.env for t in traces} == {"calculator"}
    for t in traces:
        grades = store.grades(t.id)
        assert len(grades) == 1 and grades[0].grader == "numeric" and grades[0].source == "verifier"
    # the printed rate is the stored grades' rate
    assert sum(store.grades(t.id)[0].value >= 0.5 for t in traces) == result["successes"]


USER_ENV = {
    "tasks.jsonl": "\n".join(
        json.dumps(t)
        for t in [
            {
                "id": "p1",
                "prompt": "What does a teapot cost at Mossgrove Market?",
                "answer": "17.25",
                "split": "test",
            },
            {
                "id": "p2",
                "prompt": "What does a kettle cost at Mossgrove Market?",
                "answer": "31.80",
                "split": "test",
            },
        ]
    ),
    "demos.jsonl": "\n".join(
        json.dumps({"messages": m})
        for m in [
            [
                {"role": "user", "content": "What does a lamp cost at Mossgrove Market?"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "price_of", "arguments": {"item": "lamp"}},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "name": "price_of", "content": "44.10"},
                {"role": "assistant", "content": "A lamp costs 44.10."},
            ],
            [
                {"role": "user", "content": "What does a rug cost at Mossgrove Market?"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "price_of", "arguments": {"item": "rug"}},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "name": "price_of", "content": "120.00"},
                {"role": "assistant", "content": "A rug costs 120.00."},
            ],
        ]
    ),
    "environment.py": textwrap.dedent(
        '''
        from tools import tool

        NAME = "mossgrove"
        SYSTEM_PROMPT = "You answer price questions with the price_of tool."
        PRICES = {"teapot": "17.25", "kettle": "31.80", "lamp": "44.10", "rug": "120.00"}

        @tool
        def price_of(item: str) -> str:
            """The price of an item at Mossgrove Market.

            Args:
                item: the item's name, e.g. "teapot"
            """
            return PRICES.get(item.strip().lower(), "unknown item")

        TOOLS = [price_of]

        def grade(task, answer, trace):
            ok = task.answer in (answer or "")
            return (1.0 if ok else 0.0), ("price found" if ok else "price missing")
        '''
    ),
}


async def test_user_environment_folder_runs_by_path_with_its_own_tool_and_grader(cfg, tmp_path):
    folder = tmp_path / "mossgrove"
    folder.mkdir()
    for name, text in USER_ENV.items():
        (folder / name).write_text(text)
    cfg.model.max_new_tokens = 32
    async with Agent(cfg, checkpoints=False) as agent:
        result = await run_suite(
            cfg, str(folder), split="test", few_shot=2, concurrency=2, agent=agent, progress=False
        )
        store = agent.tracer.store
        traces = [store.get(o.trace_id) for o in result.outcomes]
    assert result.env == "mossgrove" and result.n == 2
    for t in traces:
        assert t.env == "mossgrove"
        llm = next(s for s in t.spans if s.kind == "llm")
        assert [x["function"]["name"] for x in llm.llm.tools] == ["price_of"]
        grade = store.grades(t.id)[0]
        assert grade.grader == "env:mossgrove" and grade.reason in ("price found", "price missing")
        for s in t.spans:  # whenever the model called the env's tool, the tool really ran
            if s.kind == "tool" and s.status == "ok":
                assert s.tool.result in ("17.25", "31.80", "44.10", "120.00", "unknown item")


def test_review_in_a_pseudo_terminal_records_a_thumbs_down(cfg, cli_env):
    store = TraceStore(cfg.workspace.traces_db)
    tracer = Tracer(store)
    with tracer.trace(env="calculator", task_id="t-review") as t:
        with tracer.span("llm", "chat"):
            pass
        t.finish(status="ok", answer="48 * 97 = 4000")
    tracer.flush()
    child = pexpect.spawn(
        SELFTUNE, ["review", "--env", "calculator"], env=cli_env, encoding="utf-8", timeout=60
    )
    child.expect("48 \\* 97 = 4000")  # the trace is shown
    child.expect("uit")  # the key prompt
    child.send("n")
    child.expect("note")
    child.sendline("multiplied wrong")
    child.expect("uit")
    child.send("d")
    child.expect(r"down\W*(\x1b\[[0-9;]*m)?1")
    child.expect(pexpect.EOF)
    grades = store.grades(t.id)
    assert len(grades) == 1
    g = grades[0]
    assert (
        g.source == "human"
        and g.value == 0.0
        and g.reason == "multiplied wrong"
        and g.grader.startswith("human:")
    )


def test_feedback_command_replaces_the_same_persons_earlier_grade(cfg, cli_env):
    store = TraceStore(cfg.workspace.traces_db)
    tracer = Tracer(store)
    with tracer.trace(env="calculator") as t:
        t.finish(status="ok", answer="42")
    tracer.flush()
    for verdict in ("up", "down"):
        r = subprocess.run(
            [SELFTUNE, "feedback", t.id[:8], verdict, "--who", "ada"],
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
    grades = store.grades(t.id)
    assert [(g.grader, g.value) for g in grades] == [("human:ada", 0.0)]
    bad = subprocess.run(
        [SELFTUNE, "feedback", t.id[:8], "sideways"],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "up' or 'down" in bad.stderr


def test_wilson_interval_is_sane_at_the_edges():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and 0.2 < hi < 0.35
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and 0.65 < lo < 0.8
    assert wilson_interval(0, 0) == (0.0, 1.0)
