"""What the trainer trains on is what the model sees live: on a dataset mixing tools whose
arguments and schemas differ in shape (which Arrow can unify with `null`s), with OpenAI-style
rows too (arguments as JSON text, content as parts), every row's token ids are
`encode_for_training` of its exact messages, each assistant turn starts right after the live
prompt `encode_prompt` would send, and the loss covers exactly the assistant turns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _tuner_fixtures import CALCULATOR, calc_conversation

from agent.model.template import encode_for_training, encode_prompt
from tuner.schemas import TrainConfig
from tuner.train import build_trainer, load_rows, sft_dataset, train

# Unlike the calculator's: no "required", and per-property "description" and "default".
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the notes.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "what to look for"},
                "k": {"type": "integer", "default": 3},
            },
        },
    },
}
TINY = dict(batch_size=2, max_steps=1, max_length=1024, save_steps=50, learning_rate=1e-3)


def search_conversation(topic: str) -> list[dict]:
    return [
        {"role": "user", "content": f"What do my notes say about {topic}?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_0",
                    "type": "function",
                    "function": {"name": "search", "arguments": {"query": topic, "k": 2}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_0", "content": f"{topic}: water them weekly"},
        {"role": "assistant", "content": f"Your notes say to water the {topic} weekly."},
    ]


def openai_style(messages: list[dict]) -> list[dict]:
    """The same conversation as OpenAI writes it: compact JSON arguments, content as parts."""
    out = []
    for m in messages:
        m = dict(m)
        if m["role"] == "user":
            m["content"] = [{"type": "text", "text": m["content"]}]
        if m.get("tool_calls"):
            m["tool_calls"] = [
                {
                    **c,
                    "function": {
                        **c["function"],
                        "arguments": json.dumps(c["function"]["arguments"], separators=(",", ":")),
                    },
                }
                for c in m["tool_calls"]
            ]
        out.append(m)
    return out


def mixed_rows() -> list[dict]:
    rows: list[dict] = []
    for i, (a, b) in enumerate([(12, 34), (56, 78), (91, 23)]):
        rows.append({"messages": calc_conversation(a, b), "tools": [CALCULATOR]})
        topic = ["ferns", "cacti", "orchids"][i]
        tools = [SEARCH, CALCULATOR] if i % 2 else [SEARCH]
        rows.append({"messages": search_conversation(topic), "tools": tools, "subagent": "notes"})
    rows.append({"messages": openai_style(calc_conversation(45, 67)), "tools": [CALCULATOR]})
    return rows


def write_rows(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def tok(model_path):
    """The tokenizer as the live path gets it: fresh, selftune's template chosen by `auto`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path))


def assistant_text(message: dict) -> str:
    """What the model writes for an assistant turn, as the template renders it."""
    calls = []
    for c in message.get("tool_calls") or []:
        args = c["function"]["arguments"]
        args = json.loads(args) if isinstance(args, str) else args
        calls.append(
            "<tool_call>"
            + json.dumps({"name": c["function"]["name"], "arguments": args})
            + "</tool_call>"
        )
    return "\n".join(([message["content"]] if message["content"] else []) + calls) + "<|im_end|>"


def runs(ids: list[int], keep: list[bool], tok) -> list[str]:
    """The decoded stretches of consecutive kept tokens."""
    out, cur = [], []
    for t, k in zip(ids, keep, strict=True):
        if k:
            cur.append(t)
        elif cur:
            out.append(tok.decode(cur))
            cur = []
    if cur:
        out.append(tok.decode(cur))
    return out


def test_rows_are_read_exactly_and_trl_alone_would_render_some_differently(tmp_path, tok):
    """Guards the test data: Arrow (`Dataset.from_list`) adds `null` keys to these rows, and
    TRL's own rendering writes the OpenAI-style row differently from the live path."""
    import datasets

    from agent.model.template import chat_template_for, render

    rows = mixed_rows()
    assert load_rows("sft", write_rows(tmp_path / "ds", rows)) == rows
    arrow = datasets.Dataset.from_list(rows[:-1])[0]["messages"][1]["tool_calls"][0]["function"]
    assert arrow["arguments"] == {"expression": "12*34", "query": None, "k": None}
    raw, tools = rows[-1]["messages"], rows[-1]["tools"]
    trl_text = tok.apply_chat_template(
        raw, tools=tools, chat_template=chat_template_for(tok), tokenize=False
    )
    assert trl_text != render(tok, raw, tools, add_generation_prompt=False)


def test_sft_rows_are_the_live_rendering(tmp_path, model_path, tok):
    rows = mixed_rows()
    ds = write_rows(tmp_path / "ds", rows)
    trainer = build_trainer(
        "sft", ds, base_model_dir=model_path, work_dir=tmp_path / "w", config=TrainConfig(**TINY)
    )
    data = trainer.train_dataset
    assert len(data) == len(rows) and trainer.row_report == {
        "rows": len(rows),
        "truncated": 0,
        "dropped": 0,
    }
    assert set(data.column_names) <= {"input_ids", "labels"}  # no `subagent`, no messages
    for row, got in zip(rows, data, strict=True):
        messages, tools = row["messages"], row["tools"]
        ids = got["input_ids"]
        assert ids == encode_for_training(tok, messages, tools)["input_ids"]
        text = tok.decode(ids)
        assert "null" not in text
        expected_runs, mask = [], [False] * len(ids)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = encode_prompt(tok, messages[:i], tools)  # what the model is sent live
            assert ids[: len(prompt)] == prompt
            end = ids.index(tok.convert_tokens_to_ids("<|im_end|>"), len(prompt))
            mask[len(prompt) : end + 1] = [True] * (end + 1 - len(prompt))
            expected_runs.append(assistant_text(m))
        trained = [label != -100 for label in got["labels"]]
        assert trained == mask
        assert runs(ids, trained, tok) == expected_runs
        assert [label for label, k in zip(got["labels"], trained, strict=True) if k] == [
            t for t, k in zip(ids, trained, strict=True) if k
        ]


def test_rows_cut_to_max_length_are_counted(tok):
    rows = mixed_rows()[:2]
    full = [len(encode_for_training(tok, r["messages"], r["tools"])["input_ids"]) for r in rows]
    first_answer = len(encode_prompt(tok, rows[0]["messages"][:1], rows[0]["tools"]))
    # long enough for the first row's first assistant token, too short for the second row's
    cut = first_answer + 1
    assert cut < len(encode_prompt(tok, rows[1]["messages"][:1], rows[1]["tools"])) + 1
    data, report = sft_dataset(rows, tok, cut)
    assert report == {"rows": 1, "truncated": 2, "dropped": 1}
    assert len(data) == 1 and len(data[0]["input_ids"]) == cut < full[0]
    assert data[0]["assistant_masks"][-1] == 1
    _, report = sft_dataset(rows, tok, max(full))
    assert report == {"rows": 2, "truncated": 0, "dropped": 0}


def test_dpo_prompts_are_the_live_prompt(tmp_path, model_path, tok):
    """DPO still goes through Arrow and TRL's rendering; with arguments and schemas kept as JSON
    text the prompt and the chosen tool call are still what the live path renders."""
    convs = [(calc_conversation(12, 34), [CALCULATOR]), (search_conversation("ferns"), [SEARCH])]
    rows = [
        {
            "prompt": conv[:1],
            "chosen": conv[1:2],
            "rejected": [{"role": "assistant", "content": "I do not know."}],
            "tools": tools,
        }
        for conv, tools in convs
    ]
    ds = write_rows(tmp_path / "ds", rows)
    trainer = build_trainer(
        "dpo", ds, base_model_dir=model_path, work_dir=tmp_path / "w", config=TrainConfig(**TINY)
    )
    for row, got in zip(rows, trainer.train_dataset, strict=True):
        assert got["prompt_ids"] == encode_prompt(tok, row["prompt"], row["tools"])
        whole = encode_for_training(tok, row["prompt"] + row["chosen"], row["tools"])["input_ids"]
        assert got["prompt_ids"] + got["chosen_ids"] == whole


def test_one_sft_step_on_mixed_tools(tmp_path, model_path):
    """One real optimizer step (~4 s here) on the mixed rows, with their counts reported."""
    rows = mixed_rows()
    ds = write_rows(tmp_path / "ds", rows)
    result = train(
        "sft",
        ds,
        base_model_dir=model_path,
        out_dir=tmp_path / "adapter",
        config=TrainConfig(**TINY),
        progress=False,
    )
    assert result.metrics["global_step"] == 1 and result.metrics["last_loss"] > 0
    assert result.metrics["rows"] == len(rows) and result.metrics["rows_truncated"] == 0
    assert result.metrics["rows_dropped"] == 0
