"""The chat template: live prompts and training rows agree token for token, and the assistant
mask covers exactly what the model writes."""

from __future__ import annotations

import json

import pytest
from _runtime_fixtures import require_model
from _tuner_fixtures import CALCULATOR

from agent.model.template import (
    SELFTUNE_TEMPLATE,
    TemplateError,
    chat_template_for,
    encode_for_training,
    encode_prompt,
    model_template_supports_tools,
    normalize_messages,
    render,
    write_template,
)

TOOLS = [
    CALCULATOR,
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the notes.",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        },
    },
]


def _call(i, name, args):
    return {"id": f"c{i}", "type": "function", "function": {"name": name, "arguments": args}}


# a multi-turn tool conversation: two calls in one turn, a JSON-string argument, text + call
CONVERSATION = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "What is 48 + 97, and what do my notes say about Rome?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            _call(1, "calculator", {"expression": "48 + 97"}),
            _call(2, "search", json.dumps({"query": "Rome"})),
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "name": "calculator", "content": "145"},
    {"role": "tool", "tool_call_id": "c2", "name": "search", "content": "Rome: visited 2019."},
    {"role": "assistant", "content": "48 + 97 = 145. You visited Rome in 2019."},
    {"role": "user", "content": "And 2 * 3?"},
    {
        "role": "assistant",
        "content": "Let me compute.",
        "tool_calls": [_call(3, "calculator", {"expression": "2 * 3"})],
    },
    {"role": "tool", "tool_call_id": "c3", "name": "calculator", "content": "6"},
    {"role": "assistant", "content": " 2 * 3 = 6.\n"},
]


@pytest.fixture(scope="module")
def tok():
    """SmolLM2's tokenizer with SmolLM2's own chat template (setup made selftune's the
    folder's template and kept the model's beside it)."""
    from transformers import AutoTokenizer

    from agent.model.files import ORIGINAL_TEMPLATE

    folder = require_model()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.chat_template = (folder / ORIGINAL_TEMPLATE).read_text(encoding="utf-8")
    return tokenizer


def _assistant_spans(tok, messages):
    """The text of each assistant turn as the template writes it (content, calls, <|im_end|>)."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            before = render(tok, messages[:i], TOOLS, add_generation_prompt=True)
            upto = render(tok, messages[: i + 1], TOOLS, add_generation_prompt=False)
            assert upto.startswith(before)
            spans.append(upto[len(before) :].removesuffix("\n"))
    return spans


def test_smollm2_template_ignores_tools_so_selftune_template_is_used(tok):
    assert not model_template_supports_tools(tok)
    assert chat_template_for(tok, "auto") == SELFTUNE_TEMPLATE
    assert chat_template_for(tok, "model") == tok.chat_template
    with pytest.raises(TemplateError, match="auto, selftune, model"):
        chat_template_for(tok, "bogus")


def test_a_template_that_renders_tools_is_detected(tok):
    class WithTools:
        chat_template = (
            "{% for t in tools %}{{ t.function.name }}{% endfor %}{{ messages[0].content }}"
        )

        def apply_chat_template(self, *a, **k):
            return tok.apply_chat_template(*a, **k)

    t = WithTools()
    assert model_template_supports_tools(t)
    assert chat_template_for(t, "auto") == WithTools.chat_template


def test_rendering_puts_tools_in_system_and_calls_in_hermes_format(tok):
    text = render(tok, CONVERSATION, TOOLS, add_generation_prompt=False)
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nYou are a careful assistant.")
    assert '"name": "calculator"' in system and '"name": "search"' in system
    assert "<tool_call>" in system  # the instruction shows the call format
    # dict and JSON-string arguments render the same way
    assert (
        '<|im_start|>assistant\n<tool_call>{"name": "calculator", "arguments": {"expression": '
        '"48 + 97"}}</tool_call>\n<tool_call>{"name": "search", "arguments": {"query": "Rome"}}'
        "</tool_call><|im_end|>\n" in text
    )
    assert (
        "<|im_start|>tool\n145<|im_end|>\n<|im_start|>tool\nRome: visited 2019.<|im_end|>" in text
    )
    assert 'Let me compute.\n<tool_call>{"name": "calculator"' in text
    # no system message: SmolLM2's default system turn, and no tools section without tools
    plain = render(tok, [{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert plain == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_training_row_starts_with_the_live_prompt_tokens_for_every_assistant_turn(tok):
    full = encode_for_training(tok, CONVERSATION, TOOLS)["input_ids"]
    checked = 0
    for i, m in enumerate(CONVERSATION):
        if m["role"] != "assistant":
            continue
        live = encode_prompt(tok, CONVERSATION[:i], TOOLS)
        assert full[: len(live)] == live, f"assistant turn {i}: training row diverges from prompt"
        checked += 1
    assert checked == 4


def test_assistant_mask_covers_exactly_the_assistant_turns(tok):
    row = encode_for_training(tok, CONVERSATION, TOOLS)
    ids, mask = row["input_ids"], row["assistant_masks"]
    assert len(ids) == len(mask)
    masked = tok.decode([t for t, m in zip(ids, mask, strict=True) if m])
    spans = _assistant_spans(tok, CONVERSATION)
    assert masked == "".join(spans)
    assert all(s.endswith("<|im_end|>") for s in spans)  # the model learns to stop
    unmasked = tok.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    for m in CONVERSATION:
        if m["role"] in ("system", "user", "tool"):
            assert m["content"] in unmasked
    assert "<|im_start|>assistant\n" in unmasked
    # contiguous runs of the mask: one per assistant turn
    runs = sum(1 for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))
    assert runs == 4


def test_template_without_generation_markers_is_refused_for_training(tok):
    with pytest.raises(TemplateError, match='chat_template = "selftune"'):
        encode_for_training(tok, CONVERSATION[:6], TOOLS, template=tok.chat_template)


def test_write_template(tmp_path):
    p = write_template(tmp_path / "sub" / "selftune.jinja")
    assert p.read_text() == SELFTUNE_TEMPLATE


@pytest.mark.slow
def test_trl_sft_assistant_only_loss_accepts_the_template(tok, tmp_path):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    tok = tok.__class__.from_pretrained(str(require_model()))
    tok.chat_template = chat_template_for(tok, "selftune")

    # Arrow merges dict arguments of different tools into one struct (filling the missing keys
    # with nulls), so rows carry arguments as JSON strings; the template renders them verbatim.
    def as_strings(messages):
        out = []
        for m in normalize_messages(messages):
            for c in m.get("tool_calls") or []:
                c["function"]["arguments"] = json.dumps(
                    c["function"]["arguments"], ensure_ascii=False
                )
            out.append(m)
        return out

    rows = [
        {"messages": as_strings(CONVERSATION[1:6]), "tools": TOOLS},
        {"messages": as_strings(CONVERSATION), "tools": TOOLS},
    ]
    model = AutoModelForCausalLM.from_pretrained(str(require_model()), dtype=torch.float32)
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        assistant_only_loss=True,
        max_steps=1,
        per_device_train_batch_size=2,
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok
    )
    # TRL turns the template's assistant mask into labels: -100 everywhere else
    sample = trainer.train_dataset[0]
    trained = [
        t for t, lab in zip(sample["input_ids"], sample["labels"], strict=True) if lab != -100
    ]
    assert tok.decode(trained) == "".join(_assistant_spans(tok, CONVERSATION[1:6]))
    out = trainer.train()
    assert out.training_loss > 0 and torch.isfinite(torch.tensor(out.training_loss))
