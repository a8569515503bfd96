"""Small real datasets and paths for the tuner tests (calculator tool-use conversations)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from tuner.registry import Registry

MODEL_DIR = (
    Path(__file__).resolve().parent.parent / ".selftune" / "models" / "smollm2-135m-instruct"
)

CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
        },
    },
}


def need_model() -> Path:
    if not (MODEL_DIR / "config.json").is_file():
        pytest.skip(f"the converted model is missing at {MODEL_DIR}: run `selftune setup`")
    return MODEL_DIR


def calc_conversation(a: int, b: int) -> list[dict]:
    expr = f"{a}*{b}"
    return [
        {"role": "user", "content": f"What is {a} * {b}?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_0",
                    "type": "function",
                    "function": {"name": "calculator", "arguments": {"expression": expr}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_0", "content": str(a * b)},
        {"role": "assistant", "content": str(a * b)},
    ]


def _pairs(n: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(n)]


def write_dataset(folder: Path, kind: str, n: int = 8, seed: int = 0) -> Path:
    """A dataset folder of `n` rows of `kind` (sft, dpo, kto) plus a manifest.json."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (a, b) in enumerate(_pairs(n, seed)):
        conv = calc_conversation(a, b)
        prompt = conv[:1]
        good = conv[1:2]  # the tool call
        bad = [{"role": "assistant", "content": f"{a} * {b} = {a + b}"}]  # a wrong guess
        if kind == "sft":
            rows.append({"messages": conv, "tools": [CALCULATOR]})
        elif kind == "dpo":
            rows.append({"prompt": prompt, "chosen": good, "rejected": bad})
        elif kind == "kto":
            rows.append(
                {"prompt": prompt, "completion": good if i % 2 == 0 else bad, "label": i % 2 == 0}
            )
        else:
            raise ValueError(kind)
    with open(folder / "train.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    (folder / "manifest.json").write_text(
        json.dumps({"kind": kind, "rows": len(rows), "seed": seed, "traces": []}, indent=2)
    )
    return folder


def fake_adapter(folder: Path, r: int = 8) -> Path:
    """A PEFT-shaped folder (config + weights file); the registry only moves and checks it."""
    folder.mkdir(parents=True)
    cfg = {"peft_type": "LORA", "r": r, "target_modules": ["q_proj"], "modules_to_save": None}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(64))
    return folder


def make(tmp_path: Path, n: int) -> Registry:
    reg = Registry(tmp_path / "adapters")
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"rows": 3}')
    for i in range(n):
        reg.register(
            fake_adapter(tmp_path / f"train{i}", r=8 * (i + 1)),
            base_model="smollm2-135m-instruct",
            parent=f"v{i}" if i else None,
            dataset_manifest=manifest,
            train_config={"lora_r": 8 * (i + 1), "learning_rate": 2e-4},
            metrics={"train_loss": 1.0 / (i + 1)},
        )
    return reg


def real_adapter(folder: Path, base_dir: Path, r: int = 8) -> Path:
    """A fresh LoRA of the real model saved as a PEFT folder (B is zero: it answers like the
    base model), for tests that need adapters the engine can load without training one."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from agent.config import TrainConfig
    from tuner.train import finish_adapter_config, lora_config

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = get_peft_model(base, lora_config(TrainConfig(lora_r=r)))
    model.save_pretrained(str(folder), save_embedding_layers=False)
    finish_adapter_config(folder, "smollm2-135m-instruct")
    return folder
