"""The one place where a conversation becomes text and tokens, for inference and for training.

SmolLM2's own chat template ignores tools, so selftune has its own ChatML template: tool
schemas in the system turn, Hermes-style `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
in assistant turns (what vLLM's `hermes` parser reads), tool results in `tool` turns, and
`{% generation %}` markers around what the model itself writes (assistant content and its
closing `<|im_end|>`), so TRL's `assistant_only_loss` trains on exactly those tokens.

The live prompt is `render(..., add_generation_prompt=True)`, which ends in
`<|im_start|>assistant\\n`; the training rendering of the same conversation continues that text,
so what the model is trained on is what it sees when it runs.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path
from typing import Any, Literal

from tools.errors import SelftuneError

TemplateMode = Literal["auto", "selftune", "model"]

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# Kept on one logical line per statement with `{%-`/`-%}` trimming, so the rendered text has no
# stray whitespace: the only newlines are the ones written as '\n' literals.
SELFTUNE_TEMPLATE = (
    "{%- if messages and messages[0].role == 'system' -%}"
    "{%- set system_text = messages[0].content -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_text = '" + DEFAULT_SYSTEM + "' -%}{%- set turns = messages -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>system\\n' + system_text -}}"
    "{%- if tools -%}"
    "{{- '\\n\\n# Tools\\n\\nYou can call these functions:\\n<tools>' -}}"
    "{%- for tool in tools -%}"
    "{{- '\\n' -}}{{- (tool.function if tool.function is defined else tool) | tojson -}}"
    "{%- endfor -%}"
    "{{- '\\n</tools>\\n\\nTo call a function, write a JSON object with its name and arguments "
    'inside <tool_call></tool_call> tags:\\n<tool_call>{"name": "<function-name>", '
    '"arguments": {<argument-name>: <value>}}</tool_call>\' -}}'
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- for message in turns -%}"
    "{%- if message.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}"
    "{{- message.content if message.content is string else '' -}}"
    "{%- for call in (message.tool_calls or []) -%}"
    "{%- set fn = call.function if call.function is defined else call -%}"
    "{%- if loop.index0 > 0 or (message.content is string and message.content) -%}"
    "{{- '\\n' -}}"
    "{%- endif -%}"
    "{{- '<tool_call>{\"name\": ' + (fn.name | tojson) + ', \"arguments\": ' -}}"
    "{%- if fn.arguments is string -%}{{- fn.arguments -}}"
    "{%- else -%}{{- (fn.arguments if fn.arguments is not none else {}) | tojson -}}"
    "{%- endif -%}"
    "{{- '}</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>' -}}"
    "{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + (message.content if message.content is string "
    "else '') + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_PROBE_TOOL_NAME = "selftune_probe_tool_4f1c"
_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class TemplateError(SelftuneError, ValueError):
    """A chat template cannot do what was asked; the message says which setting to change."""


def model_template_supports_tools(tokenizer: Any) -> bool:
    """True when the tokenizer's own chat template writes a tool schema into the prompt."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return False
    probe = {
        "type": "function",
        "function": {
            "name": _PROBE_TOOL_NAME,
            "description": "probe",
            "parameters": {"type": "object", "properties": {}},
        },
    }
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}],
            tools=[probe],
            chat_template=template,
            tokenize=False,
            add_generation_prompt=True,
        )
    except Exception:  # noqa: BLE001 - a template that cannot take tools does not support them
        return False
    return _PROBE_TOOL_NAME in text


def chat_template_for(tokenizer: Any, mode: TemplateMode = "auto") -> str:
    """The Jinja text selftune renders with: the model's own template (`model`, or `auto` when it
    renders tools) or selftune's (`selftune`, or `auto` when the model's ignores tools)."""
    if mode == "selftune":
        return SELFTUNE_TEMPLATE
    own = getattr(tokenizer, "chat_template", None)
    if mode == "model":
        if not own:
            raise TemplateError(
                "the model's tokenizer has no chat template: set [model] chat_template = "
                '"selftune" (or "auto")'
            )
        return own
    if mode != "auto":
        raise TemplateError(f"chat_template mode {mode!r} is not one of auto, selftune, model")
    try:
        cached = _cache.get(tokenizer)
    except TypeError:
        cached = None
    if cached is None:
        cached = own if model_template_supports_tools(tokenizer) else SELFTUNE_TEMPLATE
        try:
            _cache[tokenizer] = cached
        except TypeError:
            pass
    return cached


def write_template(path: str | Path, template: str = SELFTUNE_TEMPLATE) -> Path:
    """Write the template to `path` (for vLLM's `--chat-template`) and return the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(template, encoding="utf-8")
    return p


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of OpenAI-style messages with tool-call arguments as dicts (JSON strings parsed)
    and list-of-parts content joined to text, so every caller renders the same text."""
    out = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise TemplateError(f"a message must be a dict with a 'role', got {m!r}")
        m = dict(m)
        content = m.get("content")
        if isinstance(content, list):
            m["content"] = "".join(
                p.get("text", "") if isinstance(p, dict) else str(p) for p in content
            )
        elif content is None:
            m["content"] = ""
        if m.get("tool_calls"):
            m["tool_calls"] = [_normalize_call(c) for c in m["tool_calls"]]
        out.append(m)
    return out


def _normalize_call(call: dict[str, Any]) -> dict[str, Any]:
    fn = dict(call.get("function") or call)
    args = fn.get("arguments", fn.get("args"))
    if isinstance(args, str):
        try:
            parsed = json.loads(args) if args.strip() else {}
            if isinstance(parsed, dict):
                args = parsed
        except json.JSONDecodeError:
            pass  # rendered verbatim: the model wrote it so
    fn = {"name": fn.get("name", ""), "arguments": {} if args is None else args}
    return {"id": call.get("id", ""), "type": "function", "function": fn}


def render(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    *,
    add_generation_prompt: bool,
    template: str | None = None,
) -> str:
    """The conversation as the model sees it. `template` defaults to `chat_template_for(tok)`."""
    return tokenizer.apply_chat_template(
        normalize_messages(messages),
        tools=tools or None,
        chat_template=template or chat_template_for(tokenizer),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


def encode_prompt(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    *,
    template: str | None = None,
) -> list[int]:
    """Token ids of the live prompt (ends with the assistant header the model continues)."""
    text = render(tokenizer, messages, tools, add_generation_prompt=True, template=template)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_for_training(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    *,
    template: str | None = None,
) -> dict[str, list[int]]:
    """`{"input_ids", "assistant_masks"}` for one conversation: the mask is 1 on exactly the
    tokens the model wrote (assistant content, tool calls and the closing `<|im_end|>`).

    Raises TemplateError when the template has no `{% generation %}` markers, because then the
    mask would be empty and training would silently learn nothing.
    """
    template = template or chat_template_for(tokenizer)
    out = tokenizer.apply_chat_template(
        normalize_messages(messages),
        tools=tools or None,
        chat_template=template,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    ids = list(out["input_ids"])
    mask = list(out["assistant_masks"])
    if any(m.get("role") == "assistant" for m in messages) and not any(mask):
        raise TemplateError(
            "the chat template marks no assistant tokens (it has no {% generation %} markers), "
            'so training would learn nothing: set [model] chat_template = "selftune"'
        )
    return {"input_ids": ids, "assistant_masks": mask}
