"""Environments: the built-ins (sizes, splits, graders, demos checked with the real calculator),
a user-defined environment folder loaded by path, and bad lines reported with file:line."""

from __future__ import annotations

import asyncio
import json
import random
import textwrap
from pathlib import Path

import pytest
from _traces_fixtures import make_trace

from agent.config import AgentConfig, SubagentConfig
from agent.envs import (
    ENVS_DIR,
    EnvironmentLoadError,
    demo_tool_calls,
    list_environments,
    load_environment,
    task_id_for,
)
from agent.envs.calculator import make as calculator_make
from agent.envs.delegate import make as delegate_make
from agent.envs.docs_qa import make as docs_qa_make
from agent.envs.general import make as general_make
from agent.envs.word_problems import make as word_problems_make
from tools.builtins import calculator
from traces.graders import grade_trace
from traces.read import answer_number


@pytest.fixture(scope="module")
def builtins():
    return {name: load_environment(name, strict=True) for name in list_environments()}


def test_builtins_are_listed_and_load_by_name_and_path(builtins):
    assert list_environments() == ["calculator", "docs-qa", "delegate", "word-problems", "general"]
    by_path = load_environment(builtins["calculator"].path)
    assert [t.id for t in by_path.tasks] == [t.id for t in builtins["calculator"].tasks]


@pytest.mark.parametrize("name", ["calculator", "docs-qa", "delegate", "word-problems"])
def test_builtin_sizes_splits_and_disjoint_prompts(builtins, name):
    env = builtins[name]
    train, test = env.split("train"), env.split("test")
    assert len(train) >= 200 and len(test) >= 100
    assert not {t.prompt for t in train} & {t.prompt for t in test}
    assert len({t.id for t in env.tasks}) == len(env.tasks)
    assert env.load_errors == []
    assert 1 <= len(env.demos) <= 2
    for t in env.tasks:
        assert t.tools == env.tool_names and t.answer is not None
        assert set(t.metadata["requires_tools"]) <= set(env.tool_names)


@pytest.mark.parametrize("name", ["calculator", "word-problems"])
def test_calculator_tasks_need_the_calculator(builtins, name):
    env = builtins[name]
    templates = {t.metadata["template"] for t in env.tasks}
    assert len(templates) >= 15
    for t in env.tasks:
        # the hint names the reference expression (collection only)
        assert t.hint == f"call the calculator with {t.metadata['expression']}"
        assert t.grader == "numeric"
        # the reference is exactly what the calculator says for the stored expression
        assert answer_number(calculator(t.metadata["expression"])) == pytest.approx(
            t.answer, abs=t.metadata.get("abs_tol", 1e-9)
        )
    # numbers a 135M model cannot multiply in its head
    big = [t for t in env.tasks if abs(t.answer) >= 1000 or t.answer != int(t.answer)]
    assert len(big) > 0.8 * len(env.tasks)


def test_docs_qa_answers_are_in_the_corpus(builtins):
    env = builtins["docs-qa"]
    assert env.corpus_dir is not None and env.collection == "env-docs-qa"
    files = sorted(env.corpus_dir.glob("*.md"))
    assert 15 <= len(files) <= 30
    corpus = "\n".join(f.read_text() for f in files)
    flat = corpus.replace(",", "")
    for t in env.tasks:
        assert t.grader in ("contains", "numeric")
        refs = t.answer if isinstance(t.answer, list) else [t.answer]
        for ref in refs:
            text = ref if isinstance(ref, str) else f"{ref:g}"
            assert text in corpus or text in flat, (t.id, ref)
        src = t.metadata["source"]
        assert (env.corpus_dir / src).is_file(), src


def test_delegate_declares_its_researcher(builtins):
    env = builtins["delegate"]
    assert env.tool_names == ["researcher", "calculator"]
    subs = env.subagent_configs()
    assert [s.name for s in subs] == ["researcher"] and isinstance(subs[0], SubagentConfig)
    assert subs[0].tools == ["search"]
    assert env.corpus_dir == builtins["docs-qa"].corpus_dir
    assert env.collection == builtins["docs-qa"].collection
    t = env.split("test")[0]
    assert str(t.metadata["lookup_value"]).replace(".0", "") in t.metadata["expression"]


@pytest.mark.parametrize("name", ["calculator", "docs-qa", "delegate", "word-problems"])
def test_demos_use_real_tool_names_and_correct_results(builtins, name):
    env = builtins[name]
    for demo in env.demos:
        calls = demo_tool_calls(demo)
        assert calls
        for tool_name, args, content in calls:
            assert tool_name in env.tool_names
            if tool_name == "calculator":
                assert calculator(**args) == content  # the real tool gives the demo's result
        final = demo["messages"][-1]["content"]
        last_calc = [c for n, _, c in calls if n == "calculator"]
        if last_calc:
            assert answer_number(final) == float(last_calc[-1])
        if tool_name == "search":
            corpus = "\n".join(p.read_text() for p in env.corpus_dir.glob("*.md"))
            assert content.split("\n", 1)[1] in corpus


MAKES = {
    "calculator": calculator_make,
    "word_problems": word_problems_make,
    "docs_qa": docs_qa_make,
    "delegate": delegate_make,
    "general": general_make,
}


def _data(folder: Path) -> dict[str, bytes]:
    """Every file a make.py writes: tasks.jsonl, demos.jsonl and corpus/*.md."""
    files = [folder / "tasks.jsonl", folder / "demos.jsonl", *sorted(folder.glob("corpus/*.md"))]
    return {str(f.relative_to(folder)): f.read_bytes() for f in files if f.exists()}


@pytest.mark.parametrize("folder", MAKES)
def test_each_make_rewrites_its_shipped_data_byte_for_byte(tmp_path, folder):
    shipped = _data(ENVS_DIR / folder)
    for run in ("first", "second"):
        MAKES[folder].write(tmp_path / run)
        assert _data(tmp_path / run) == shipped, f"stale: python -m agent.envs.{folder}.make"


@pytest.mark.parametrize("changed", MAKES)
def test_changing_one_generator_leaves_the_others_data_alone(tmp_path, monkeypatch, changed):
    """Each make.py draws from its own random.Random(SEED): one that draws more (here, one
    number more from its stream and one from the global one) changes its own tasks only."""
    assert len({m.SEED for m in MAKES.values()}) == len(MAKES)
    make = MAKES[changed]
    tasks = make.tasks
    monkeypatch.setattr(make, "tasks", lambda rng: (rng.random(), random.random(), tasks(rng))[2])
    for folder, m in MAKES.items():
        m.write(tmp_path / folder)
        same = _data(tmp_path / folder) == _data(ENVS_DIR / folder)
        assert same == (folder != changed), folder


def test_unknown_environment_names_the_choices():
    with pytest.raises(EnvironmentLoadError, match="calculator, docs-qa, delegate"):
        load_environment("no-such-env")


# --- a user-defined environment -----------------------------------------------------------------

ENV_PY = '''
from tools import tool

NAME = "shop"
SYSTEM_PROMPT = "You run a shop."

PRICES = {"apple": 0.4, "pear": 0.55}


@tool
def price_of(item: str) -> str:
    """The unit price of an item in euros.

    Args:
        item: The item's name, e.g. "apple".
    """
    return str(PRICES[item])


def lookup_stock(item: str) -> str:
    """How many of an item are in stock.

    Args:
        item: The item's name.
    """
    return "12"


TOOLS = [price_of, lookup_stock]
REQUIRES_TOOLS = ["price_of"]


def grade(task, answer, trace):
    called = any(s.tool and s.tool.name == "price_of" for s in trace.spans)
    if task.answer.lower() in answer.lower():
        return (1.0, "names the item") if called else (0.5, "right but did not look the price up")
    return 0.0, "wrong item"
'''


def _write_env(root: Path) -> Path:
    env = root / "shop"
    env.mkdir()
    (env / "environment.py").write_text(ENV_PY)
    lines = [
        {"id": "a", "prompt": "Which is cheaper, an apple or a pear?", "answer": "apple"},
        {"prompt": "Which fruit costs 0.55 euros?", "answer": "pear", "split": "test"},
        {"id": "c", "answer": "apple"},  # line 3: no prompt
        "not json at all",  # line 4
        {"id": "a", "prompt": "A second task with the first one's id", "answer": "x"},  # line 5
        {
            "id": "f",
            "prompt": "What does a pear cost?",
            "answer": 0.55,
            "grader": "numeric",
            "split": "test",
        },
        {"id": "g", "prompt": "Any split?", "answer": "x", "split": "validation"},  # line 7
        {"id": "h", "prompt": "Typo", "answer": "x", "gradr": "exact"},  # line 8
        {"id": "i", "prompt": "Numeric without a number", "answer": "lots", "grader": "numeric"},
    ]
    text = "\n".join(ln if isinstance(ln, str) else json.dumps(ln) for ln in lines)
    (env / "tasks.jsonl").write_text(text + "\n\n")
    demo = {
        "messages": [
            {"role": "user", "content": "What does an apple cost?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "price_of", "arguments": {"item": "apple"}},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "name": "price_of", "content": "0.4"},
            {"role": "assistant", "content": "An apple costs 0.40 euros."},
        ]
    }
    bad_demo = {"messages": [{"role": "tool", "tool_call_id": "zz", "content": "1"}]}
    (env / "demos.jsonl").write_text(json.dumps(demo) + "\n" + json.dumps(bad_demo) + "\n")
    return env


def test_user_environment_folder_loads_by_path(tmp_path):
    env = load_environment(_write_env(tmp_path))
    assert env.name == "shop" and env.system_prompt == "You run a shop."
    assert [t.id for t in env.tasks] == ["a", task_id_for("Which fruit costs 0.55 euros?"), "f"]
    assert [t.id for t in env.split("train")] == ["a"]
    assert [t.id for t in env.split("test")][1] == "f"
    assert env.tool_names == ["price_of", "lookup_stock"] and env.tasks[0].tools == env.tool_names
    assert env.grader == "env" and env.tasks[0].grader == "env" and env.tasks[2].grader == "numeric"
    assert len(env.demos) == 1
    errors = "\n".join(env.load_errors)
    assert "tasks.jsonl:3: 'prompt' is required" in errors
    assert "tasks.jsonl:4: not valid JSON" in errors
    assert "tasks.jsonl:5: duplicate id 'a' (first on line 1)" in errors
    assert "tasks.jsonl:7: 'split'" in errors and "validation" in errors
    assert "tasks.jsonl:8: unknown field(s) ['gradr']" in errors
    assert "tasks.jsonl:9: reference answer 'lots' holds no number" in errors
    assert "demos.jsonl:2: messages[0]: tool turn answers 'zz'" in errors
    assert len(env.load_errors) == 7
    with pytest.raises(ValueError, match="'train' or 'test'"):
        env.split("dev")


def test_user_environment_tools_are_callable(tmp_path):
    env = load_environment(_write_env(tmp_path))
    tools = {t.name: t for t in env.tools}
    assert asyncio.run(tools["price_of"].ainvoke({"item": "pear"})) == "0.55"
    assert asyncio.run(tools["lookup_stock"].ainvoke({"item": "pear"})) == "12"
    assert tools["price_of"].schema()["function"]["parameters"]["required"] == ["item"]


def test_user_environment_custom_grader(tmp_path):
    env = load_environment(_write_env(tmp_path))
    t = env.task("a")
    used = make_trace("An apple.", [("price_of", {"item": "apple"}, "0.4")], env="shop")
    guessed = make_trace("An apple.", env="shop")
    g = asyncio.run(env.agrade(t, used))
    assert (g.value, g.reason, g.grader) == (1.0, "names the item", "env:shop")
    g = asyncio.run(env.agrade(t, guessed))
    assert g.value == 0.5 and g.flags == []  # 0.5 is not "right": no required-tool flag
    assert asyncio.run(env.agrade(t, make_trace("A pear.", env="shop"))).value == 0.0
    # a task that names its own grader uses it
    assert grade_trace(env.task("f"), make_trace("0.55 euros")).value == 1.0


def test_strict_raises_on_the_first_bad_line(tmp_path):
    with pytest.raises(EnvironmentLoadError, match=r"tasks.jsonl:3: 'prompt' is required"):
        load_environment(_write_env(tmp_path), strict=True)


def test_bare_task_file_takes_config_defaults(tmp_path):
    f = tmp_path / "sums.jsonl"
    f.write_text('{"prompt": "What is 2 + 2?", "answer": 4}\n{"prompt": "Name a colour."}\n')
    env = load_environment(f, config=AgentConfig(tools=["calculator", "python"]))
    assert env.name == "sums" and env.tool_names == ["calculator", "python"]
    assert [t.grader for t in env.tasks] == ["exact"]  # the second line has no answer to compare
    assert "sums.jsonl:2: 'answer' is required for grader 'exact'" in env.load_errors[0]
    assert env.tasks[0].id == task_id_for("What is 2 + 2?") and env.tasks[0].split == "train"


def test_environment_py_errors_name_the_file(tmp_path):
    env = tmp_path / "broken"
    env.mkdir()
    (env / "tasks.jsonl").write_text('{"prompt": "x", "answer": "y"}\n')
    (env / "environment.py").write_text("GRADER = 'fuzzy'\n")
    with pytest.raises(
        EnvironmentLoadError, match=r"environment.py: GRADER: unknown grader 'fuzzy'"
    ):
        load_environment(env)
    (env / "environment.py").write_text("SUBAGENTS = [{'name': 'r'}]\n")
    with pytest.raises(EnvironmentLoadError, match="SUBAGENTS entry"):
        load_environment(env)
    (env / "environment.py").write_text("import no_such_module_here\n")
    with pytest.raises(EnvironmentLoadError, match="failed to import: ModuleNotFoundError"):
        load_environment(env)
    (env / "environment.py").unlink()
    (env / "tasks.jsonl").unlink()
    with pytest.raises(EnvironmentLoadError, match="has no tasks.jsonl"):
        load_environment(env)


def test_readme_example_environment_loads(tmp_path):
    """The example in agent/envs/README.md is a working environment."""
    readme = (Path(__file__).resolve().parents[1] / "agent/envs/README.md").read_text()
    blocks = dict(
        (b.split("\n", 1)[0].strip(), b.split("\n", 1)[1])
        for b in readme.split("```")[1::2]
        if b.split("\n", 1)[0].strip() in ("jsonl", "python")
    )
    env_dir = tmp_path / "my_env"
    env_dir.mkdir()
    (env_dir / "tasks.jsonl").write_text(blocks["jsonl"])
    (env_dir / "environment.py").write_text(textwrap.dedent(blocks["python"]))
    env = load_environment(env_dir, strict=True)
    assert env.tasks and env.tools
