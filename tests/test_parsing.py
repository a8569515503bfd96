"""Tool-call parsing on what small models really write (several collected from SmolLM2 with
selftune's template and one worked example), plus the malformed shapes listed in the issue."""

from __future__ import annotations

import pytest

from agent.model.parsing import FORMAT_HINT, parse_tool_calls

CALC = ("calculator", {"expression": "48 + 97"})

# (model output, expected content, expected [(name, arguments)], expected error count)
CASES = [
    # collected from SmolLM2-135M-Instruct (greedy and sampled at T=0.8)
    (
        '<tool_call>{"name": "calculator", "arguments": {"expression": "48 + 97"}}</tool_call>',
        "",
        [CALC],
        0,
    ),
    (  # ran out of max_tokens inside the closing tag
        '<tool_call>{"name": "calculator", "arguments": {"expression": "48 + 97"}}</tool_',
        "",
        [CALC],
        0,
    ),
    (  # unquoted keys
        '<tool_call>{"name": "france", "arguments": {"temperature": {Celsius: 25, Fahrenheit: 18}}}</tool_call>',
        "",
        [("france", {"temperature": {"Celsius": 25, "Fahrenheit": 18}})],
        0,
    ),
    ("48 + 97 = 195.", "48 + 97 = 195.", [], 0),
    (  # a bare JSON in a code fence that is not a call (no arguments key) stays text
        '```json\n{\n  "name": "calculator",\n  "description": "Evaluate arithmetic"\n}\n```',
        '```json\n{\n  "name": "calculator",\n  "description": "Evaluate arithmetic"\n}\n```',
        [],
        0,
    ),
    # the cases the issue lists
    (
        '<tool_call>{"name": "calculator", "arguments": {"expression": "48 + 97"}}} and more</tool_call>',
        "",
        [CALC],
        0,
    ),
    (
        "<tool_call>{'name': 'calculator', 'arguments': {'expression': '48 + 97'}}</tool_call>",
        "",
        [CALC],
        0,
    ),
    ('<tool_call>{"name": "calculator", "arguments": {"expression": "48 + 97"}}', "", [CALC], 0),
    ('<tool_call>{"name": "calculator", "arguments": {"expression": "48 + 97"', "", [CALC], 0),
    (
        'Sure, two calls.\n<tool_call>{"name": "a", "arguments": {}}</tool_call>\n'
        '<tool_call>{"name": "b", "arguments": {"x": [1, 2]}}</tool_call>',
        "Sure, two calls.",
        [("a", {}), ("b", {"x": [1, 2]})],
        0,
    ),
    (
        '<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"48 + 97\\"}"}</tool_call>',
        "",
        [CALC],
        0,
    ),
    (
        '<tool_call>{"name": "calculator", "parameters": {"expression": "48 + 97"}}</tool_call>',
        "",
        [CALC],
        0,
    ),
    (
        '```json\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "48 + 97"}}\n</tool_call>\n```',
        "",
        [CALC],
        0,
    ),
    ('```json\n{"name": "calculator", "arguments": {"expression": "48 + 97"}}\n```', "", [CALC], 0),
    (
        '<tool_call>{"type": "function", "function": {"name": "calculator", "arguments": {"expression": "48 + 97"}}}</tool_call>',
        "",
        [CALC],
        0,
    ),
    ('{"name": "calculator", "arguments": {"expression": "48 + 97"}}</tool_call>', "", [CALC], 0),
    (
        '<tool_call>{"name": "f", "arguments": {"ok": true, "n": null, "v": -2}}',
        "",
        [("f", {"ok": True, "n": None, "v": -2})],
        0,
    ),
    # what cannot be read becomes an error, and the good call next to it is kept
    (
        '<tool_call>calculator(48 + 97)</tool_call><tool_call>{"name": "a", "arguments": {}}</tool_call>',
        "",
        [("a", {})],
        1,
    ),
    ("<tool_call></tool_call>", "", [], 1),
    ('<tool_call>{"arguments": {"x": 1}}</tool_call>', "", [], 1),
    ('<tool_call>{"name": "f", "arguments": "not json"}</tool_call>', "", [], 1),
    ('<tool_call>{"name": "f", "arguments": [1, 2]}</tool_call>', "", [], 1),
]


@pytest.mark.parametrize("text,content,calls,n_errors", CASES)
def test_parse_table(text, content, calls, n_errors):
    r = parse_tool_calls(text)
    assert r.content == content
    assert [(c.name, c.arguments) for c in r.calls] == calls
    assert len(r.errors) == n_errors
    for e in r.errors:
        assert e.startswith("could not parse tool call: ") and e.endswith(FORMAT_HINT)
    assert len({c.id for c in r.calls}) == len(r.calls)


def test_raw_arguments_keep_the_models_own_text():
    r = parse_tool_calls('<tool_call>{"name":"c","arguments":{"a":1,  "b":[1,2]}} junk</tool_call>')
    assert r.calls[0].raw_arguments == '{"a":1,  "b":[1,2]}'
    r = parse_tool_calls('<tool_call>{"name": "c", "arguments": "{\\"a\\": 1}"}</tool_call>')
    assert r.calls[0].raw_arguments == '{"a": 1}'


def test_error_names_the_problem():
    r = parse_tool_calls('<tool_call>{"name": "f", "arguments": "not json"}</tool_call>')
    assert "arguments string is not a JSON object" in r.errors[0]
    assert "not json" in r.errors[0]
    r = parse_tool_calls('<tool_call>{"arguments": {}}</tool_call>')
    assert 'no "name"' in r.errors[0]


@pytest.mark.parametrize(
    "junk", [None, "", "<tool_call>", "</tool_call>", "{" * 50, "<tool_call>{'a': }"]
)
def test_never_raises(junk):
    r = parse_tool_calls(junk)
    assert isinstance(r.content, str)
