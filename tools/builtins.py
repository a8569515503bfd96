"""Built-in tools: a safe calculator (here) and the sandboxed python runner (tools/sandbox.py).

The calculator walks the expression's AST and evaluates only arithmetic; it never calls `eval`.

Numbers: `1_000` is Python syntax and works. A comma is read as a thousands separator
("1,234" -> 1234) only when it is unambiguous: the expression calls no function (in
`max(1,234)` the comma separates arguments) and the comma is followed by exactly three digits.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable
from typing import Any

from tools.base import Tool, ToolError

MAX_EXPRESSION_CHARS = 500
MAX_INT_DIGITS = 1000  # Python refuses to print ints above ~4300 digits anyway
MAX_EXPONENT = 10_000
SIGNIFICANT_DIGITS = 10

_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_FUNCS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt,
    "abs": abs,
    "round": round,
    "min": min,
    "max": max,
    "floor": math.floor,
    "ceil": math.ceil,
    "log": math.log,
    "log10": math.log10,
    "log2": math.log2,
    "exp": math.exp,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
}
_CONSTS = {"pi": math.pi, "e": math.e}
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_CALL_RE = re.compile(r"[A-Za-z_]\w*\s*\(")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression and return the result.

    Supports + - * / // % **, parentheses, and sqrt, abs, round, min, max, floor, ceil, log,
    log10, log2, exp, sin, cos, tan, pi, e. Example: "sqrt(2) * (3 + 4) ** 2".

    Args:
        expression: The arithmetic expression to evaluate, e.g. "12 * (3 + 4)".
    """
    return format_number(evaluate(expression))


def evaluate(expression: str) -> int | float:
    """The value of `expression`; raises ToolError for anything that is not plain arithmetic."""
    text = expression.strip()
    if not text:
        raise ToolError("the expression is empty: pass an arithmetic expression like '2 + 3'")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ToolError(
            f"the expression is {len(text)} characters long; the limit is {MAX_EXPRESSION_CHARS}"
        )
    if not _CALL_RE.search(text):
        text = _THOUSANDS_RE.sub("", text)
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise ToolError(f"cannot parse {expression!r}: {e.msg}") from None
    try:
        value = _eval(tree.body)
    except ToolError:
        raise
    except ZeroDivisionError:
        raise ToolError(f"division by zero in {expression!r}") from None
    except OverflowError:
        raise ToolError(f"the result of {expression!r} is too large") from None
    except (ValueError, TypeError) as e:
        raise ToolError(f"cannot evaluate {expression!r}: {e}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolError(f"the result of {expression!r} is not a finite number ({value})")
    return value


def format_number(value: int | float) -> str:
    """Integers as they are; floats to 10 significant digits without float noise (0.1+0.2 -> 0.3)."""
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int):
        return str(value)
    text = format(value, f".{SIGNIFICANT_DIGITS}g")
    if "e" not in text and "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise ToolError(f"only numbers are allowed, not {node.value!r}")
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        v = _eval(node.operand)
        return -v if isinstance(node.op, ast.USub) else +v
    if isinstance(node, ast.BinOp):
        if isinstance(node.op, ast.BitXor):
            raise ToolError("'^' is not a power here: write powers as a ** b")
        op = _BINOPS.get(type(node.op))
        if op is None:
            raise ToolError(f"operator {type(node.op).__name__} is not supported")
        left, right = _eval(node.left), _eval(node.right)
        _check_size(node.op, left, right)
        return _check_int(op(left, right))
    if isinstance(node, ast.Name):
        if node.id in _CONSTS:
            return _CONSTS[node.id]
        raise ToolError(f"unknown name {node.id!r}: allowed are {', '.join(_CONSTS)}")
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCS:
            name = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
            raise ToolError(f"unknown function {name!r}: allowed are {', '.join(_FUNCS)}")
        if node.keywords:
            raise ToolError("keyword arguments are not supported")
        args = [_eval(a) for a in node.args]
        return _check_int(_FUNCS[node.func.id](*args))
    if isinstance(node, ast.Tuple):
        raise ToolError(
            "commas are only allowed between function arguments or as thousands separators "
            "(like 1,234)"
        )
    raise ToolError(f"{type(node).__name__} is not allowed: only arithmetic is supported")


def _check_size(op: ast.operator, left: int | float, right: int | float) -> None:
    """Refuse an operation whose result would be absurdly large before computing it."""
    limit_bits = int(MAX_INT_DIGITS * 3.33)
    if isinstance(op, ast.Pow):
        if abs(right) > MAX_EXPONENT:
            raise ToolError(f"exponent {right} is too large (limit {MAX_EXPONENT})")
        if isinstance(left, int) and isinstance(right, int) and right > 0:
            if max(abs(left), 1).bit_length() * right > limit_bits and abs(left) > 1:
                raise ToolError(f"the result has more than {MAX_INT_DIGITS} digits")
    elif isinstance(op, ast.Mult) and isinstance(left, int) and isinstance(right, int):
        if abs(left).bit_length() + abs(right).bit_length() > limit_bits + 1:
            raise ToolError(f"the result has more than {MAX_INT_DIGITS} digits")


def _check_int(value: Any) -> Any:
    if isinstance(value, int) and abs(value).bit_length() > int(MAX_INT_DIGITS * 3.33) + 1:
        raise ToolError(f"the result has more than {MAX_INT_DIGITS} digits")
    return value


def calculator_tool() -> Tool:
    t = Tool.from_function(calculator)
    t.hints = {"readOnlyHint": True, "idempotentHint": True, "openWorldHint": False}
    return t
