"""Environments: a set of tasks, how to grade them, and the tools and demonstrations they need.

Design your own environment
===========================

An environment is either a single task file (`tasks.jsonl`; its tools and grader come from the
configuration's defaults) or a folder:

    my_env/
      tasks.jsonl      # required: one task per line
      demos.jsonl      # optional: worked demonstrations, one conversation per line
      environment.py   # optional: tools, a grader, a system prompt, subagents
      corpus/          # optional: documents the runner indexes for the `search` tool

Anywhere an environment is asked for (`selftune eval ENV`, `selftune improve ENV`), give a
built-in name (`calculator`, `word-problems`, `docs-qa`, `delegate`) or a path.

tasks.jsonl - one JSON object per line; only "prompt" is required:

    {"id": "t1", "prompt": "What is 1234 * 5678?", "answer": 7006652, "grader": "numeric",
     "split": "train", "tools": ["calculator"], "metadata": {"requires_tools": ["calculator"]}}

- id: unique in the file; default: the first 12 hex digits of the prompt's sha1 (stable).
- answer: the reference the grader compares with (a value, or a list).
- grader: exact | numeric | contains | regex | judge | env | a Python path `module:function`
  (see traces/graders.py); default: the environment's grader.
- split: train | test; default train.
- tools: tool names offered for this task; default: the environment's tools.
- metadata: free-form; graders read `rel_tol`, `abs_tol`, `number`, `rubric`; the flags read
  `requires_tools` (tools a right answer must have used).
Blank lines and lines starting with `//` are skipped.

demos.jsonl - one conversation per line in the SFT `messages` format, tool calls included:

    {"messages": [
      {"role": "user", "content": "What is 1234 * 5678?"},
      {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function",
        "function": {"name": "calculator", "arguments": {"expression": "1234 * 5678"}}}]},
      {"role": "tool", "tool_call_id": "call_1", "name": "calculator", "content": "7006652"},
      {"role": "assistant", "content": "1234 * 5678 = 7,006,652."}]}

environment.py - every name is optional:

    NAME = "my-env"                   # default: the folder's name
    SYSTEM_PROMPT = "You are ..."     # default: the configured system prompt
    TOOLS = [lookup_price]            # Tool objects or @tool functions defined here
    TOOL_NAMES = ["calculator", "lookup_price"]  # tools tasks get (default: TOOLS' names,
                                      # else the configured [agent] tools)
    GRADER = "numeric"                # a grader name, or a function like grade below
    def grade(task, answer, trace):   # -> float in [0, 1], or (float, reason)
        ...
    JUDGE_RUBRIC = "..."              # for the judge grader
    REQUIRES_TOOLS = ["calculator"]   # tools a right answer must have used (flags)
    SUBAGENTS = [{"name": "researcher", "description": "...", "system_prompt": "...",
                  "tools": ["search"]}]   # fields of agent.config.SubagentConfig
    CORPUS = "corpus"                 # documents for `search` (default: ./corpus if present)
    COLLECTION = "env-my-env"         # the Chroma collection the corpus is indexed into
    DEMOS = [{"messages": [...]}]     # extra demonstrations

A bad line is reported as `tasks.jsonl:17: 'prompt' is required` and skipped (the errors are
kept in `Environment.load_errors` and logged as warnings); `strict=True` raises on the first.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.config import AgentConfig, Config, SubagentConfig
from tools.base import Tool
from tools.errors import SelftuneError
from traces.graders import (
    BUILTIN_GRADERS,
    ENV_GRADER,
    RULE_GRADERS,
    agrade_trace,
    as_number,
    check_grader_name,
)
from traces.schemas import Grade, GraderError, Task, Trace

log = logging.getLogger(__name__)

ENVS_DIR = Path(__file__).parent
BUILTIN_ENVS = {
    "calculator": "calculator",
    "docs-qa": "docs_qa",
    "delegate": "delegate",
    "word-problems": "word_problems",
    "general": "general",
}
TASKS_FILE, DEMOS_FILE, MODULE_FILE = "tasks.jsonl", "demos.jsonl", "environment.py"
_ROLES = {"system", "user", "assistant", "tool"}


class EnvironmentLoadError(SelftuneError, ValueError):
    """An environment cannot be loaded; the message names the file, the line and the fix."""


@dataclass
class Environment:
    """A loaded environment. `tasks` holds every valid task (both splits)."""

    name: str
    path: Path
    tasks: list[Task] = field(default_factory=list)
    demos: list[dict[str, Any]] = field(default_factory=list)
    tools: list[Tool] = field(default_factory=list)  # extra tools from environment.py
    tool_names: list[str] = field(default_factory=list)  # the tools a task gets by default
    grader: str = "exact"  # the default grader name ("env" = grade_fn)
    grade_fn: Callable | None = None  # environment.py's own grade(task, answer, trace)
    system_prompt: str | None = None
    judge_rubric: str | None = None
    requires_tools: list[str] = field(default_factory=list)
    subagents: list[dict[str, Any]] = field(default_factory=list)  # SubagentConfig fields
    corpus_dir: Path | None = None
    collection: str | None = None  # Chroma collection for corpus_dir
    load_errors: list[str] = field(default_factory=list)

    def split(self, name: str) -> list[Task]:
        """The tasks of split `name` ("train" or "test"), in file order."""
        if name not in ("train", "test"):
            raise ValueError(f"split {name!r} does not exist: use 'train' or 'test'")
        return [t for t in self.tasks if t.split == name]

    def task(self, task_id: str) -> Task:
        """The task with this id; KeyError naming the environment if there is none."""
        for t in self.tasks:
            if t.id == task_id:
                return t
        raise KeyError(f"environment {self.name!r} has no task {task_id!r}")

    def subagent_configs(self) -> list[SubagentConfig]:
        return [SubagentConfig(**s) for s in self.subagents]

    async def agrade(
        self, task: Task, trace: Trace, grader_name: str | None = None, *, judge_model: Any = None
    ) -> Grade:
        """Grade `trace` with this environment's grader, rubric, demos and required tools."""
        return await agrade_trace(
            task,
            trace,
            grader_name,
            judge_model=judge_model,
            env_grader=self.grade_fn,
            rubric=self.judge_rubric,
            demos=self.demos,
            requires_tools=self.requires_tools,
        )


def list_environments() -> list[str]:
    """The built-in environment names."""
    return [name for name, folder in BUILTIN_ENVS.items() if (ENVS_DIR / folder).is_dir()]


def task_id_for(prompt: str) -> str:
    """The default task id: the first 12 hex digits of the prompt's sha1."""
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:12]


def resolve_environment_path(name_or_path: str | Path) -> Path:
    """A built-in name or a path -> the environment's folder or task file."""
    key = str(name_or_path)
    if key in BUILTIN_ENVS:
        return ENVS_DIR / BUILTIN_ENVS[key]
    p = Path(name_or_path).expanduser()
    if p.exists():
        return p.resolve()
    raise EnvironmentLoadError(
        f"environment {key!r} is neither a built-in ({', '.join(list_environments())}) nor an "
        "existing folder or tasks.jsonl file"
    )


def load_environment(
    name_or_path: str | Path, *, strict: bool = False, config: AgentConfig | None = None
) -> Environment:
    """Load a built-in environment by name, or a folder / task file by path.

    `config` supplies the defaults a bare task file lacks (its [agent] tools and system
    prompt). Bad task or demo lines are skipped, collected in `load_errors` and logged;
    with `strict=True` the first one raises EnvironmentLoadError.
    """
    config = config or AgentConfig()
    path = resolve_environment_path(name_or_path)
    folder = path if path.is_dir() else path.parent
    tasks_file = path / TASKS_FILE if path.is_dir() else path
    if not tasks_file.is_file():
        raise EnvironmentLoadError(
            f"environment folder {path} has no {TASKS_FILE}: add one (one JSON task per line)"
        )
    env = Environment(name=path.name if path.is_dir() else path.stem, path=path)
    env.tool_names = list(config.tools)
    env.system_prompt = config.system_prompt
    if path.is_dir() and (path / MODULE_FILE).is_file():
        _apply_module(env, path / MODULE_FILE)
    elif path.is_dir() and (path / "corpus").is_dir():
        env.corpus_dir = path / "corpus"
    if env.corpus_dir is not None and env.collection is None:
        env.collection = collection_name(env.name)

    def report(message: str) -> None:
        if strict:
            raise EnvironmentLoadError(message)
        env.load_errors.append(message)
        log.warning("%s", message)

    env.tasks = _load_tasks(tasks_file, env, report)
    demos_file = folder / DEMOS_FILE if path.is_dir() else None
    if demos_file is not None and demos_file.is_file():
        env.demos = _load_demos(demos_file, report) + env.demos
    for i, demo in enumerate(env.demos):
        problem = demo_problem(demo)
        if problem:
            report(f"demonstration {i + 1} of {env.name}: {problem}")
    return env


def collection_name(env_name: str) -> str:
    """A valid Chroma collection name for an environment's corpus."""
    slug = re.sub(r"[^a-zA-Z0-9._-]+", "-", env_name).strip("-._") or "env"
    return f"env-{slug}"[:60]


def _apply_module(env: Environment, module_path: Path) -> None:
    """Read environment.py's optional names into `env`."""
    module_name = "selftune_env_" + re.sub(r"\W", "_", str(module_path.parent))
    spec = importlib.util.spec_from_file_location(module_name, module_path)
    if spec is None or spec.loader is None:
        raise EnvironmentLoadError(f"{module_path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # so dataclasses and pickling inside it work
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise EnvironmentLoadError(
            f"{module_path} failed to import: {type(e).__name__}: {e}"
        ) from e
    where = str(module_path)
    env.name = str(getattr(module, "NAME", env.name))
    env.system_prompt = getattr(module, "SYSTEM_PROMPT", env.system_prompt)
    env.judge_rubric = getattr(module, "JUDGE_RUBRIC", None)
    env.tools = [_as_tool(t, where) for t in getattr(module, "TOOLS", [])]
    names = [t.name for t in env.tools]
    if len(set(names)) != len(names):
        raise EnvironmentLoadError(f"{where}: TOOLS has two tools of the same name: {names}")
    if hasattr(module, "TOOL_NAMES"):
        env.tool_names = list(module.TOOL_NAMES)
    elif env.tools:
        env.tool_names = names
    env.requires_tools = list(getattr(module, "REQUIRES_TOOLS", []))
    grader = getattr(module, "GRADER", None)
    grade_fn = getattr(module, "grade", None)
    if callable(grader):
        grade_fn, grader = grader, None
    if grade_fn is not None:
        if not callable(grade_fn):
            raise EnvironmentLoadError(f"{where}: grade must be a function (task, answer, trace)")
        env.grade_fn, env.grader = grade_fn, ENV_GRADER
    if grader is not None:
        try:
            check_grader_name(str(grader))
        except GraderError as e:
            raise EnvironmentLoadError(f"{where}: GRADER: {e}") from None
        env.grader = str(grader)
    subagents = list(getattr(module, "SUBAGENTS", []))
    for s in subagents:
        try:
            SubagentConfig(**s)
        except (ValidationError, TypeError) as e:
            raise EnvironmentLoadError(f"{where}: SUBAGENTS entry {s!r} is invalid: {e}") from None
    env.subagents = subagents
    corpus = getattr(module, "CORPUS", None)
    if corpus is not None:
        env.corpus_dir = (module_path.parent / corpus).resolve()
        if not env.corpus_dir.is_dir():
            raise EnvironmentLoadError(f"{where}: CORPUS folder {env.corpus_dir} does not exist")
    elif (module_path.parent / "corpus").is_dir():
        env.corpus_dir = module_path.parent / "corpus"
    env.collection = getattr(module, "COLLECTION", None)
    env.demos = list(getattr(module, "DEMOS", []))


def _as_tool(obj: Any, where: str) -> Tool:
    if isinstance(obj, Tool):
        return obj
    if callable(obj):
        try:
            return Tool.from_function(obj, source=f"env:{where}")
        except ValueError as e:
            raise EnvironmentLoadError(f"{where}: TOOLS entry {obj!r}: {e}") from None
    raise EnvironmentLoadError(
        f"{where}: TOOLS holds {obj!r}, which is neither a Tool nor a function"
    )


def _load_tasks(path: Path, env: Environment, report: Callable[[str], None]) -> list[Task]:
    tasks: list[Task] = []
    seen: dict[str, int] = {}
    for lineno, data in _jsonl(path, report):
        where = f"{path.name}:{lineno}"
        problem = _task_problem(data)
        if problem:
            report(f"{where}: {problem}")
            continue
        data = dict(data)
        data.setdefault("id", task_id_for(data["prompt"]))
        if data.get("grader") is None:
            data["grader"] = env.grader
        if data.get("tools") is None:
            data["tools"] = list(env.tool_names)
        try:
            task = Task.model_validate(data)
        except ValidationError as e:
            report(f"{where}: {_explain(e)}")
            continue
        if not task.id:
            task.id = task_id_for(task.prompt)
        problem = _reference_problem(task, env)
        if problem:
            report(f"{where}: {problem}")
            continue
        if task.id in seen:
            report(f"{where}: duplicate id {task.id!r} (first on line {seen[task.id]})")
            continue
        seen[task.id] = lineno
        tasks.append(task)
    return tasks


def _task_problem(data: Any) -> str | None:
    if not isinstance(data, dict):
        return f"a task must be a JSON object, got {type(data).__name__}"
    if "prompt" not in data:
        return "'prompt' is required"
    if not isinstance(data["prompt"], str) or not data["prompt"].strip():
        return "'prompt' must be a non-empty string"
    unknown = sorted(set(data) - set(Task.model_fields))
    if unknown:
        return f"unknown field(s) {unknown}: allowed are {sorted(Task.model_fields)}"
    return None


def _reference_problem(task: Task, env: Environment) -> str | None:
    name = task.grader or env.grader
    try:
        check_grader_name(name)
    except GraderError as e:
        return str(e)
    if name == ENV_GRADER and env.grade_fn is None:
        return "grader 'env' needs a grade function in environment.py"
    if name in RULE_GRADERS and task.answer is None:
        return f"'answer' is required for grader {name!r} (or use grader 'judge')"
    if name == "numeric":
        try:
            for ref in task.answer if isinstance(task.answer, list) else [task.answer]:
                as_number(ref)
        except GraderError as e:
            return str(e)
    if name == "regex":
        for ref in task.answer if isinstance(task.answer, list) else [task.answer]:
            try:
                re.compile(str(ref))
            except re.error as e:
                return f"'answer' {ref!r} is not a valid regular expression: {e}"
    if name not in BUILTIN_GRADERS and name != ENV_GRADER and ":" not in name:
        return f"unknown grader {name!r}"
    return None


def _explain(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(task)"
        parts.append(f"'{key}' {e['msg'].lower()} (got {e.get('input')!r})")
    return "; ".join(parts)


def _jsonl(path: Path, report: Callable[[str], None]):
    """(line number, parsed value) for each non-blank, non-comment line of a JSONL file."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.startswith("//"):
                continue
            try:
                yield lineno, json.loads(text)
            except json.JSONDecodeError as e:
                report(f"{path.name}:{lineno}: not valid JSON ({e.msg} at column {e.colno})")


def _load_demos(path: Path, report: Callable[[str], None]) -> list[dict[str, Any]]:
    demos = []
    for lineno, data in _jsonl(path, report):
        problem = demo_problem(data)
        if problem:
            report(f"{path.name}:{lineno}: {problem}")
            continue
        demos.append(data)
    return demos


def demo_problem(demo: Any) -> str | None:
    """What is wrong with a demonstration in SFT `messages` format, or None if it is fine."""
    if not isinstance(demo, dict) or not isinstance(demo.get("messages"), list):
        return 'a demonstration must be {"messages": [...]}'
    messages = demo["messages"]
    if not messages:
        return "'messages' is empty"
    open_calls: dict[str, str] = {}
    for i, m in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            return f"{at}: needs a 'role' of {sorted(_ROLES)}"
        if m["role"] == "assistant" and m.get("tool_calls"):
            for c in m["tool_calls"]:
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not fn.get("name") or not c.get("id"):
                    return f"{at}: a tool call needs 'id' and 'function': {{'name', 'arguments'}}"
                if c.get("type", "function") != "function":
                    return f"{at}: tool call type must be 'function'"
                if not isinstance(fn.get("arguments", {}), dict):
                    return f"{at}: tool-call arguments must be a JSON object, not a string"
                open_calls[c["id"]] = fn["name"]
        elif m["role"] == "tool":
            call_id = m.get("tool_call_id")
            if call_id not in open_calls:
                return f"{at}: tool turn answers {call_id!r}, which no earlier tool call has"
            if m.get("name") not in (None, open_calls[call_id]):
                return f"{at}: tool turn is named {m.get('name')!r}, the call was {open_calls[call_id]!r}"
        elif not isinstance(m.get("content"), str):
            return f"{at}: {m['role']} turn needs a 'content' string"
    if messages[-1]["role"] != "assistant" or messages[-1].get("tool_calls"):
        return "the last turn must be the assistant's final answer"
    return None


def demo_tool_calls(demo: dict[str, Any]) -> list[tuple[str, dict[str, Any], str | None]]:
    """(tool name, arguments, the tool turn's content) for each tool call of a demonstration."""
    results = {
        m.get("tool_call_id"): m.get("content") for m in demo["messages"] if m["role"] == "tool"
    }
    out = []
    for m in demo["messages"]:
        for c in m.get("tool_calls") or []:
            out.append(
                (c["function"]["name"], c["function"].get("arguments", {}), results.get(c["id"]))
            )
    return out


def environment_tasks(env: str, cfg: Config) -> tuple[str, dict[tuple[str, str], Task]]:
    """The environment's name as its traces record it ("docs-qa" loads the folder docs_qa) and
    its tasks keyed by (name, task_id), each with the environment's default grader filled in.
    When `env` is not a loadable environment: `env` itself and no tasks (traces may come from
    tasks given on the command line; GRPO then reads answers from trace metadata)."""
    try:
        loaded = load_environment(env, config=cfg.agent)
    except EnvironmentLoadError as e:
        log.warning("no task records for %s (%s)", env, e)
        return env, {}
    tasks = {
        (loaded.name, t.id): t if t.grader else t.model_copy(update={"grader": loaded.grader})
        for t in loaded.tasks
    }
    return loaded.name, tasks
