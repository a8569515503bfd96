"""Conversation messages as plain dicts, the one shape that traces, datasets and templates share.

    {"role": "system" | "user" | "assistant" | "tool", "content": str,
     "tool_calls": [{"id", "type": "function", "function": {"name", "arguments": {...}}}],  # assistant
     "tool_call_id": str, "name": str}                                                      # tool

Tool-call arguments are dicts (what TRL's SFT rows and our chat template expect), not the JSON
strings of the OpenAI wire format.
"""

from __future__ import annotations

import json
from typing import Any

from langchain_core.messages import BaseMessage, convert_to_messages, convert_to_openai_messages


def _args_dict(args: Any) -> dict[str, Any]:
    if isinstance(args, dict):
        return args
    if isinstance(args, str):
        try:
            parsed = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return {"_raw": args}
        return parsed if isinstance(parsed, dict) else {"_value": parsed}
    return {}


def to_message_dicts(messages: list[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages -> our dicts (tool-call arguments as dicts, text content as str)."""
    out: list[dict[str, Any]] = []
    for m in convert_to_openai_messages(messages, text_format="string"):
        d: dict[str, Any] = {"role": m["role"], "content": m.get("content") or ""}
        if m.get("tool_calls"):
            d["tool_calls"] = [
                {
                    "id": c.get("id") or "",
                    "type": "function",
                    "function": {
                        "name": c["function"]["name"],
                        "arguments": _args_dict(c["function"].get("arguments")),
                    },
                }
                for c in m["tool_calls"]
            ]
        if m["role"] == "tool":
            d["tool_call_id"] = m.get("tool_call_id", "")
            if m.get("name"):
                d["name"] = m["name"]
        out.append(d)
    # convert_to_openai_messages drops ToolMessage.name; keep it (templates show it)
    for d, m in zip(out, messages, strict=False):
        if d["role"] == "tool" and getattr(m, "name", None):
            d["name"] = m.name
    return out


def from_message_dicts(messages: list[dict[str, Any]]) -> list[BaseMessage]:
    """Our dicts (or OpenAI wire dicts) -> LangChain messages."""
    wire = []
    for m in messages:
        w = dict(m)
        if w.get("tool_calls"):
            w["tool_calls"] = [
                {
                    "id": c.get("id") or f"call_{i}",
                    "type": "function",
                    "function": {
                        "name": c["function"]["name"],
                        "arguments": json.dumps(_args_dict(c["function"].get("arguments"))),
                    },
                }
                for i, c in enumerate(w["tool_calls"])
            ]
        wire.append(w)
    return list(convert_to_messages(wire))
