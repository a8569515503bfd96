"""The Tool abstraction, the calculator, the registry and the LangChain bridge."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel

from tools import Tool, ToolError, ToolLoadError, builtin_tools, load_module_tools, tool
from tools.base import parse_docstring
from tools.builtins import calculator


def weather(city: str, unit: Literal["c", "f"] = "c", days: list[int] | None = None) -> str:
    """Get the weather forecast for a city.

    More detail that is not part of the summary.

    Args:
        city: The city's name,
            in English.
        unit (str): Temperature unit.
        days: Which days ahead to report.

    Returns:
        A forecast.
    """
    return f"{city}:{unit}:{days}"


def test_from_function_builds_openai_schema():
    t = Tool.from_function(weather)
    s = t.schema()
    assert s["type"] == "function"
    f = s["function"]
    assert f["name"] == "weather"
    assert f["description"] == "Get the weather forecast for a city."
    p = f["parameters"]
    assert p["type"] == "object" and p["required"] == ["city"]
    assert p["additionalProperties"] is False
    assert p["properties"]["city"] == {
        "type": "string",
        "description": "The city's name, in English.",
    }
    assert p["properties"]["unit"]["enum"] == ["c", "f"]
    assert p["properties"]["unit"]["default"] == "c"
    assert p["properties"]["unit"]["description"] == "Temperature unit."
    days = p["properties"]["days"]
    assert {"type": "array", "items": {"type": "integer"}} in days["anyOf"]
    assert days["default"] is None


def test_numpy_docstring():
    doc = textwrap.dedent(
        """Add two numbers.

        Parameters
        ----------
        a : int
            The first.
        b : int
            The second,
            continued.
        """
    )
    summary, params = parse_docstring(doc)
    assert summary == "Add two numbers."
    assert params == {"a": "The first.", "b": "The second, continued."}


def test_ainvoke_validates_arguments_with_actionable_errors():
    t = Tool.from_function(weather)
    assert asyncio.run(t.ainvoke({"city": "Oslo", "days": [1, 2]})) == "Oslo:c:[1, 2]"
    cases = {
        "is required but missing": {},
        "unknown argument": {"city": "Oslo", "country": "NO"},
        "is not of type 'string'": {"city": 3},
        "is not one of": {"city": "Oslo", "unit": "k"},
    }
    for message, args in cases.items():
        with pytest.raises(ToolError, match=message) as e:
            asyncio.run(t.ainvoke(args))
        assert "Expected: {city: string (required)" in str(e.value)
    with pytest.raises(ToolError, match="JSON object"):
        asyncio.run(t.ainvoke(["Oslo"]))


def test_failures_become_tool_errors_and_async_functions_work():
    @tool
    def boom(n: int) -> int:
        """Fail loudly."""
        raise KeyError(n)

    @tool(name="adder", description="Adds.")
    async def add(a: int, b: int = 1) -> dict:
        return {"sum": a + b}

    with pytest.raises(ToolError, match="tool 'boom' failed: KeyError"):
        asyncio.run(boom.ainvoke({"n": 1}))
    assert add.name == "adder" and add.description == "Adds."
    assert asyncio.run(add.ainvoke({"a": 2})) == '{"sum": 3}'
    assert asyncio.run(add(4, 5)) == {"sum": 9}  # still callable as the function


class Point(BaseModel):
    x: float
    y: float


def test_pydantic_model_parameters_are_converted():
    def norm(p: Point) -> float:
        """Length of a point's vector."""
        return (p.x**2 + p.y**2) ** 0.5

    t = Tool.from_function(norm)
    assert asyncio.run(t.ainvoke({"p": {"x": 3, "y": 4}})) == "5.0"
    with pytest.raises(ToolError, match="'p': 'y' is required but missing. Expected: {p: object"):
        asyncio.run(t.ainvoke({"p": {"x": 3}}))


def test_bad_tool_definitions_are_refused():
    def untyped(x):
        """Doc."""

    def undocumented(x: int):
        pass

    with pytest.raises(ValueError, match="no type annotation"):
        Tool.from_function(untyped)
    with pytest.raises(ValueError, match="no description"):
        Tool.from_function(undocumented)
    with pytest.raises(ValueError, match="not valid for tool calling"):
        Tool("bad name", "d", {"type": "object"})


@pytest.mark.parametrize(
    "expr, expected",
    [
        ("0.1 + 0.2", "0.3"),
        ("2 ** 100", "1267650600228229401496703205376"),
        ("7 // 2 + 7 % 2", "4"),
        ("-(3 - 5) * 2", "4"),
        ("6 / 3", "2"),
        ("10 / 4", "2.5"),
        ("1,234 + 1", "1235"),
        ("1_000 * 3", "3000"),
        ("max(1,234)", "234"),
        ("sqrt(16) + abs(-2) + floor(2.7) + ceil(2.1)", "11"),
        ("round(pi, 3)", "3.142"),
        ("log(e) + exp(0) + sin(0) + cos(0) + tan(0)", "3"),
        ("1 / 3", "0.3333333333"),
    ],
)
def test_calculator(expr: str, expected: str):
    assert calculator(expr) == expected


@pytest.mark.parametrize(
    "expr, message",
    [
        ("__import__('os').system('true')", "unknown function"),
        ("open('x')", "unknown function"),
        ("x + 1", "unknown name 'x'"),
        ("9 ** 9 ** 9", "too large"),
        ("10 ** 5000", "more than 1000 digits"),
        ("1 / 0", "division by zero"),
        ("2 ^ 3", r"write powers as a \*\* b"),
        ("1" * 600, "limit is 500"),
        ("(1, 2)", "commas"),
        ("'a' * 3", "only numbers"),
        ("sqrt(-1)", "math domain error"),
        ("1e308 * 10", "not a finite number"),
        ("", "empty"),
        ("2 +", "cannot parse"),
    ],
)
def test_calculator_refuses(expr: str, message: str):
    with pytest.raises(ToolError, match=message):
        calculator(expr)


def test_builtin_registry_and_langchain_bridge():
    tools = builtin_tools()
    assert set(tools) == {"calculator", "python"}
    lc = tools["calculator"].to_langchain()
    assert lc.name == "calculator"
    assert asyncio.run(lc.ainvoke({"expression": "6*7"})) == "42"
    # a ToolError reaches the model as the tool's answer instead of raising
    assert "division by zero" in asyncio.run(lc.ainvoke({"expression": "1/0"}))


def test_load_module_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "my_tools.py").write_text(
        textwrap.dedent(
            '''
            from tools import Tool, tool

            @tool
            def shout(text: str) -> str:
                """Upper-case text."""
                return text.upper()

            def helper(x: int) -> int:
                """Not a tool: not decorated."""
                return x

            echo = Tool("echo", "Echo.", {"type": "object", "properties": {"t": {"type": "string"}}},
                        func=lambda t: t)
            '''
        )
    )
    (tmp_path / "broken_tools.py").write_text("import not_a_real_module\n")
    (tmp_path / "empty_tools.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = {t.name: t for t in load_module_tools("my_tools")}
    assert set(found) == {"shout", "echo"}
    assert found["shout"].source == "module:my_tools"
    assert asyncio.run(found["shout"].ainvoke({"text": "hi"})) == "HI"
    with pytest.raises(
        ToolLoadError, match="'broken_tools'.*ModuleNotFoundError.*not_a_real_module"
    ):
        load_module_tools("broken_tools")
    with pytest.raises(ToolLoadError, match="'empty_tools' defines no tools"):
        load_module_tools("empty_tools")
    with pytest.raises(ToolLoadError, match="'nope_missing'"):
        load_module_tools("nope_missing")
    for name in ("my_tools", "broken_tools", "empty_tools"):
        sys.modules.pop(name, None)


def test_cli_lists_and_calls_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import json

    from typer.testing import CliRunner

    from agent.cli.tools import tools_app

    monkeypatch.chdir(tmp_path)  # no selftune.toml here
    monkeypatch.setenv("SELFTUNE_HOME", str(tmp_path / "ws"))
    runner = CliRunner()
    listed = runner.invoke(tools_app, ["list", "--json"])
    assert listed.exit_code == 0, listed.output
    assert {s["function"]["name"] for s in json.loads(listed.stdout)} == {"calculator", "python"}
    called = runner.invoke(tools_app, ["call", "calculator", '{"expression": "6*7"}'])
    assert called.exit_code == 0 and called.stdout.strip() == "42"
    bad = runner.invoke(tools_app, ["call", "calculator", '{"expr": "1"}'])
    assert bad.exit_code == 1 and "'expression' is required" in bad.output
    unknown = runner.invoke(tools_app, ["call", "nope", "{}"])
    assert unknown.exit_code == 1 and "unknown tool 'nope'" in unknown.output
    notjson = runner.invoke(tools_app, ["call", "calculator", "{oops"])
    assert notjson.exit_code == 2 and "not valid JSON" in notjson.output
