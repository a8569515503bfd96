"""The Tool: a name, a description, a JSON schema for its arguments, and something to call.

`Tool.from_function(fn)` (or the `@tool` decorator) turns a typed, documented Python function
into a Tool: parameter types come from the annotations (Literal, list[...], Optional, pydantic
models, defaults), per-parameter descriptions from the docstring's Google-style `Args:` or
numpy-style `Parameters` section, and the description from the docstring's first paragraph.

`await tool.ainvoke(arguments)` validates the arguments against the schema and returns text.
Every failure, bad arguments included, is a `ToolError` whose message the model can act on.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, get_type_hints

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, create_model

from tools.errors import SelftuneError

ToolFunc = Callable[..., Any] | Callable[..., Awaitable[Any]]
_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


class ToolError(SelftuneError):
    """A tool call failed; the message is written for the model that made the call."""


@dataclass(eq=False)
class Tool:
    """A callable tool. `func` takes the arguments as keyword arguments (sync or async)."""

    name: str
    description: str
    parameters: dict[str, Any]
    func: ToolFunc | None = field(default=None, repr=False)
    source: str = "builtin"  # "builtin", "mcp:<server>", "module:<mod>", "subagent", ...
    server: str | None = None  # the MCP server's name, for MCP tools
    # MCP tool annotations (readOnlyHint, destructiveHint, idempotentHint, openWorldHint), which
    # clients show and use to decide what needs a person's confirmation
    hints: dict[str, bool] = field(default_factory=dict)
    # Converts validated JSON arguments into what `func` takes (set by from_function).
    _convert: Callable[[dict[str, Any]], dict[str, Any]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(
                f"tool name {self.name!r} is not valid for tool calling: use 1-64 letters, "
                "digits, '_' or '-'"
            )
        if self.parameters.get("type") != "object":
            raise ValueError(
                f"tool {self.name!r}: parameters must be a JSON schema with type 'object', "
                f"got {self.parameters!r}"
            )
        jsonschema.Draft202012Validator.check_schema(self.parameters)

    @classmethod
    def from_function(
        cls,
        fn: ToolFunc,
        name: str | None = None,
        description: str | None = None,
        source: str = "builtin",
    ) -> Tool:
        """A Tool whose schema is read from `fn`'s signature and docstring.

        Every parameter needs a type annotation; `*args`/`**kwargs` are refused.
        """
        fname = name or fn.__name__
        summary, arg_docs = parse_docstring(inspect.getdoc(fn) or "")
        try:
            hints = get_type_hints(fn, include_extras=True)
        except NameError as e:
            raise ValueError(
                f"tool {fname!r}: cannot resolve its type annotations ({e}); define the types "
                "at module level so they can be looked up"
            ) from None
        fields: dict[str, Any] = {}
        for pname, p in inspect.signature(fn).parameters.items():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise ValueError(f"tool {fname!r}: *args/**kwargs cannot be described to a model")
            if pname not in hints:
                raise ValueError(
                    f"tool {fname!r}: parameter {pname!r} has no type annotation; add one "
                    "so the model knows what to pass"
                )
            default = ... if p.default is p.empty else p.default
            fields[pname] = (hints[pname], Field(default, description=arg_docs.get(pname)))
        model = create_model(  # type: ignore[call-overload]
            f"{fname}_args", __config__=ConfigDict(extra="forbid"), **fields
        )
        schema = _clean_schema(model.model_json_schema())
        schema.setdefault("properties", {})
        schema["additionalProperties"] = False

        def convert(args: dict[str, Any]) -> dict[str, Any]:
            # The JSON schema is checked first; this turns dicts into pydantic models etc.
            parsed = model.model_validate(args)
            return {k: getattr(parsed, k) for k in args}

        desc = description or summary
        if not desc:
            raise ValueError(
                f"tool {fname!r} has no description: give it a docstring or description="
            )
        return cls(fname, desc, schema, fn, source=source, _convert=convert)

    def schema(self) -> dict[str, Any]:
        """The OpenAI function-calling format."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }

    def validate(self, arguments: Any) -> dict[str, Any]:
        """Return `arguments` if they satisfy the schema, else raise ToolError saying what to fix."""
        if not isinstance(arguments, dict):
            raise ToolError(
                f"tool '{self.name}' takes a JSON object of arguments, got "
                f"{type(arguments).__name__}: {arguments!r}"
            )
        validator = jsonschema.Draft202012Validator(self.parameters)
        errors = sorted(validator.iter_errors(arguments), key=lambda e: list(e.path))
        if errors:
            problems = "; ".join(_describe_error(e) for e in errors[:5])
            raise ToolError(
                f"invalid arguments for tool '{self.name}': {problems}. "
                f"Expected: {_signature_text(self.parameters)}"
            )
        return arguments

    async def ainvoke(self, arguments: dict[str, Any]) -> str:
        """Validate `arguments`, call the tool and return its result as text.

        Sync functions run in a worker thread. Raises ToolError for bad arguments and for any
        failure of the tool itself.
        """
        args = self.validate(arguments)
        if self.func is None:
            raise ToolError(f"tool '{self.name}' has nothing to call")
        try:
            kwargs = self._convert(args) if self._convert else args
            if inspect.iscoroutinefunction(self.func):
                result = await self.func(**kwargs)
            else:
                result = await asyncio.to_thread(self.func, **kwargs)
                if inspect.isawaitable(result):
                    result = await result
        except ToolError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure is reported to the model
            raise ToolError(f"tool '{self.name}' failed: {type(e).__name__}: {e}") from e
        return result_text(result)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the underlying function directly (a decorated function stays usable)."""
        if self.func is None:
            raise TypeError(f"tool {self.name!r} has no Python function to call")
        return self.func(*args, **kwargs)

    def to_langchain(self):
        """A LangChain `StructuredTool`; ToolErrors come back to the model as the tool's answer."""
        from langchain_core.tools import StructuredTool, ToolException

        async def run(**kwargs: Any) -> str:
            try:
                return await self.ainvoke(kwargs)
            except ToolError as e:
                raise ToolException(str(e)) from e

        def run_sync(**kwargs: Any) -> str:
            return asyncio.run(run(**kwargs))

        return StructuredTool(
            name=self.name,
            description=self.description,
            args_schema=self.parameters,
            coroutine=run,
            func=run_sync,
            handle_tool_error=True,
            metadata={"source": self.source, "server": self.server},
        )


def tool(
    fn: ToolFunc | None = None, *, name: str | None = None, description: str | None = None
) -> Any:
    """Decorator: `@tool` or `@tool(name=..., description=...)` turns a function into a Tool.

    The result is still callable like the function.
    """

    def wrap(f: ToolFunc) -> Tool:
        return Tool.from_function(f, name=name, description=description, source=_source_of(f))

    return wrap(fn) if fn is not None else wrap


def result_text(result: Any) -> str:
    """A tool's return value as the text the model sees (str as is; the rest as JSON)."""
    if isinstance(result, str):
        return result
    if isinstance(result, BaseModel):
        return result.model_dump_json()
    try:
        return json.dumps(result, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(result)


_SECTION_RE = re.compile(
    r"^(Args|Arguments|Parameters|Returns|Return|Raises|Yields|Examples?|Notes?|See Also)\s*:?\s*$"
)
_GOOGLE_ARG_RE = re.compile(r"^(\*{0,2}\w+)\s*(\([^)]*\))?\s*:\s*(.*)$")
_NUMPY_ARG_RE = re.compile(r"^(\w+)\s*(:\s*.*)?$")


def parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(summary, {param: description}) from a Google- or numpy-style docstring."""
    lines = doc.expandtabs().splitlines()
    summary_lines: list[str] = []
    for line in lines:
        if not line.strip() or _SECTION_RE.match(line.strip()):
            break
        summary_lines.append(line.strip())
    summary = " ".join(summary_lines)

    params: dict[str, str] = {}
    i = 0
    while i < len(lines):
        m = _SECTION_RE.match(lines[i].strip())
        if not m or m.group(1) not in ("Args", "Arguments", "Parameters"):
            i += 1
            continue
        base = len(lines[i]) - len(lines[i].lstrip())
        i += 1
        numpy = i < len(lines) and set(lines[i].strip()) == {"-"}
        if numpy:
            i += 1
        current: str | None = None
        entry_indent: int | None = None
        while i < len(lines):
            line = lines[i]
            if not line.strip():
                i += 1
                continue
            indent = len(line) - len(line.lstrip())
            text = line.strip()
            if _SECTION_RE.match(text) and indent <= base:
                break
            if not numpy and indent <= base:
                break
            if entry_indent is None:
                entry_indent = indent
            if indent == entry_indent:
                regex = _NUMPY_ARG_RE if numpy else _GOOGLE_ARG_RE
                am = regex.match(text)
                if am:
                    current = am.group(1).lstrip("*")
                    params[current] = "" if numpy else am.group(3).strip()
                else:
                    break  # neither an entry nor a continuation: the section has ended
            elif current is not None:
                params[current] = (params[current] + " " + text).strip()
            i += 1
    return summary, params


def _source_of(fn: ToolFunc) -> str:
    mod = getattr(fn, "__module__", None)
    return f"module:{mod}" if mod and not mod.startswith("tools.") else "builtin"


def _clean_schema(node: Any) -> Any:
    """Drop pydantic's titles (noise to a model) and inline nothing else."""
    if isinstance(node, dict):
        return {
            k: _clean_schema(v)
            for k, v in node.items()
            if not (k == "title" and isinstance(v, str))
        }
    if isinstance(node, list):
        return [_clean_schema(v) for v in node]
    return node


def _describe_error(e: jsonschema.ValidationError) -> str:
    where = ".".join(str(p) for p in e.path)
    msg = e.message
    if e.validator == "required":
        msg = msg.replace("is a required property", "is required but missing")
    elif e.validator == "additionalProperties":
        msg = msg.replace("Additional properties are not allowed", "unknown argument(s)")
    return f"'{where}': {msg}" if where else msg


def _signature_text(schema: dict[str, Any]) -> str:
    """`{a: string (required), b: integer}`, short enough to put in an error message."""
    req = set(schema.get("required", []))
    parts = []
    for pname, p in schema.get("properties", {}).items():
        typ = p.get("type") or "|".join(
            str(a.get("type", "?")) for a in p.get("anyOf", []) if isinstance(a, dict)
        )
        if "$ref" in p:
            typ = "object"
        if "enum" in p:
            typ = " | ".join(json.dumps(v) for v in p["enum"])
        parts.append(f"{pname}: {typ or 'any'}{' (required)' if pname in req else ''}")
    return "{" + ", ".join(parts) + "}"
