"""Tool calls out of model text, tolerant of what small models really write.

The canonical form is Hermes style, `<tool_call>{"name": "f", "arguments": {...}}</tool_call>`.
Accepted as well: JSON followed by junk, single quotes or unquoted keys (Python-literal style),
a missing closing tag or closing braces, several calls in one message, arguments given as a
JSON string, `"parameters"` (or `"args"`) for `"arguments"`, OpenAI's nested `"function"`
shape, and code fences around the JSON. A message that is nothing but a fenced or bare JSON
object with a name and arguments counts as a call too.

`parse_tool_calls` never raises: what cannot be read becomes an error string that tells the
model how to write the call.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
FORMAT_HINT = 'write <tool_call>{"name": "<tool name>", "arguments": {...}}</tool_call>'
_FENCE = re.compile(r"```[a-zA-Z0-9_-]*[ \t]*\n?|```")
_ARG_KEYS = ("arguments", "parameters", "args", "input")
_LITERALS = {"true": True, "false": False, "null": None, "none": None}


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: dict[str, Any]
    raw_arguments: str  # the text the model wrote for the arguments (or the whole call body)


@dataclass
class ParseResult:
    content: str  # the text around the calls, stripped
    calls: list[ParsedCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:16]}"


def parse_tool_calls(text: str) -> ParseResult:
    """Split `text` into plain content, parsed calls and readable errors. Never raises."""
    try:
        return _parse(text or "")
    except Exception as e:  # noqa: BLE001 - the promise is "never raises"; keep the text
        return ParseResult(content=text or "", errors=[_error(f"internal parser error {e!r}", "")])


def _parse(text: str) -> ParseResult:
    bodies, content = _split(text)
    if not bodies:
        bare = _bare_call(text)
        if bare is not None:
            return ParseResult(content="", calls=[bare])
        return ParseResult(content=text.strip())
    result = ParseResult(content=content)
    for body in bodies:
        call, err = _parse_body(body)
        if call is not None:
            result.calls.append(call)
        else:
            result.errors.append(err)
    return result


def _split(text: str) -> tuple[list[str], str]:
    """The bodies between `<tool_call>` tags (a missing close ends at the next open or at the
    end), and the text outside them."""
    bodies: list[str] = []
    outside: list[str] = []
    pos = 0
    # a stray close tag with no open before it: the model forgot the open tag
    first_open, first_close = text.find(OPEN), text.find(CLOSE)
    if first_close != -1 and (first_open == -1 or first_close < first_open):
        brace = text.find("{", 0, first_close)
        if brace != -1:
            outside.append(text[:brace])
            bodies.append(text[brace:first_close])
            pos = first_close + len(CLOSE)
    while True:
        i = text.find(OPEN, pos)
        if i == -1:
            outside.append(text[pos:])
            break
        outside.append(text[pos:i])
        start = i + len(OPEN)
        nxt_close, nxt_open = text.find(CLOSE, start), text.find(OPEN, start)
        ends = [e for e in (nxt_close, nxt_open) if e != -1]
        end = min(ends) if ends else len(text)
        bodies.append(text[start:end])
        pos = end + len(CLOSE) if end == nxt_close and end != -1 else end
    content = _FENCE.sub("", "".join(outside)) if bodies else "".join(outside)
    return bodies, content.strip()


def _bare_call(text: str) -> ParsedCall | None:
    """A message that is only a (fenced) JSON object naming a function and its arguments."""
    stripped = _FENCE.sub("", text).strip()
    if not stripped.startswith("{"):
        return None
    obj, _ = _load_object(stripped)
    if not isinstance(obj, dict) or not any(k in _unwrap(obj) for k in _ARG_KEYS):
        return None
    call, _ = _call_from_object(obj, stripped)
    return call


def _parse_body(body: str) -> tuple[ParsedCall | None, str]:
    cleaned = _FENCE.sub("", body).strip()
    if not cleaned:
        return None, _error("the <tool_call> tag is empty", body)
    obj, why = _load_object(cleaned)
    if obj is None:
        return None, _error(why, body)
    return _call_from_object(obj, cleaned)


def _unwrap(obj: dict[str, Any]) -> dict[str, Any]:
    fn = obj.get("function")
    return fn if isinstance(fn, dict) and "name" in fn else obj


def _call_from_object(obj: Any, raw: str) -> tuple[ParsedCall | None, str]:
    if not isinstance(obj, dict):
        return None, _error(f"expected a JSON object, got {type(obj).__name__}", raw)
    obj = _unwrap(obj)
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        return None, _error('the object has no "name" string', raw)
    key = next((k for k in _ARG_KEYS if k in obj), None)
    args: Any = obj.get(key) if key else {}
    raw_args = raw
    if isinstance(args, str):
        raw_args = args
        if args.strip():
            parsed, why = _load_object(args.strip())
            if not isinstance(parsed, dict):
                return None, _error(f"the arguments string is not a JSON object ({why})", raw)
            args = parsed
        else:
            args = {}
    elif args is None:
        args = {}
    elif isinstance(args, dict):
        raw_args = _raw_span(raw, key) or json.dumps(args, ensure_ascii=False)
    else:
        return None, _error(f'"arguments" must be an object, got {type(args).__name__}', raw)
    call_id = obj.get("id") if isinstance(obj.get("id"), str) else new_call_id()
    return ParsedCall(id=call_id, name=name.strip(), arguments=args, raw_arguments=raw_args), ""


def _raw_span(raw: str, key: str | None) -> str | None:
    """The model's own text of the arguments object, found after its key."""
    if key is None:
        return None
    m = re.search(r"[\"']?" + key + r"[\"']?\s*:\s*(?=\{)", raw)
    return _balanced(raw[m.end() :]) if m else None


def _load_object(text: str) -> tuple[Any, str]:
    """The first JSON-ish object in `text`: strict JSON, else Python-literal style (single
    quotes, unquoted keys, True/None), closing braces added if the text ran out."""
    start = text.find("{")
    if start == -1:
        return None, "no JSON object found"
    try:
        obj, _ = json.JSONDecoder().raw_decode(text, start)
        return obj, ""
    except json.JSONDecodeError as e:
        first_error = f"invalid JSON ({e.msg} at char {e.pos - start})"
    candidate = _balanced(text[start:])
    try:
        return json.loads(candidate), ""
    except json.JSONDecodeError:
        pass
    try:
        return _literal(candidate), ""
    except (SyntaxError, ValueError):
        return None, first_error


def _balanced(text: str) -> str:
    """`text` cut after its outermost object closes, or closed if it never does."""
    stack: list[str] = []
    quote: str | None = None
    escaped = False
    for i, ch in enumerate(text):
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
            continue
        if ch in "\"'":
            quote = ch
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]":
            if stack and stack[-1] == ch:
                stack.pop()
            if not stack:
                return text[: i + 1]
    return text + (quote or "") + "".join(reversed(stack))


def _literal(text: str) -> Any:
    """Evaluate a Python-literal-style object safely; bare names become strings (unquoted
    keys), except true/false/null/None which keep their meaning."""
    tree = ast.parse(text.replace("\n", " "), mode="eval")
    return _node(tree.body)


def _node(n: ast.AST) -> Any:
    if isinstance(n, ast.Constant):
        return n.value
    if isinstance(n, ast.Dict):
        return {_key(k): _node(v) for k, v in zip(n.keys, n.values, strict=True)}
    if isinstance(n, ast.List | ast.Tuple | ast.Set):
        return [_node(e) for e in n.elts]
    if isinstance(n, ast.Name):
        return _LITERALS.get(n.id.lower(), n.id)
    if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub | ast.UAdd):
        v = _node(n.operand)
        if isinstance(v, int | float):
            return -v if isinstance(n.op, ast.USub) else v
    raise ValueError(f"not a literal: {ast.dump(n)[:60]}")


def _key(k: ast.AST | None) -> str:
    if k is None:
        raise ValueError("dict unpacking is not a literal")
    v = _node(k)
    return v if isinstance(v, str) else json.dumps(v)


def _error(why: str, body: str) -> str:
    snippet = body.strip()
    if len(snippet) > 200:
        snippet = snippet[:200] + "..."
    return f"could not parse tool call: {why} in {snippet!r}; {FORMAT_HINT}"
