"""Small real calculator data for the tests: the tool schema, demos, tool-use datasets, a toy
GRPO environment and adapter registries."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import safetensors.numpy

from tuner.registry import Registry

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


# Two examples, the last ending on its tool call: the style the runner's --few-shot uses
# (a small model copies the latest assistant turn, so ending on a call makes it call).
WORKED_EXAMPLE = [
    {"role": "user", "content": "What is 23 * 19?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "ex1",
                "type": "function",
                "function": {"name": "calculator", "arguments": {"expression": "23 * 19"}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "ex1", "name": "calculator", "content": "437"},
    {"role": "assistant", "content": "The answer is 437."},
    {"role": "user", "content": "What is 311 * 72?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "ex2",
                "type": "function",
                "function": {"name": "calculator", "arguments": {"expression": "311 * 72"}},
            }
        ],
    },
]


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
    # a real (tiny, random) safetensors file: the registry checks it opens and records its hash
    weights = {"lora_A": np.frombuffer(os.urandom(64), dtype=np.float32).copy()}
    (folder / "adapter_model.safetensors").write_bytes(safetensors.numpy.save(weights))
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


# A reward that varies between samples of one task (so groups carry signal), a task whose
# grader throws, and a task every sample of which gets the same reward.
ENV_PY = """
NAME = "grpo-toy"
SYSTEM_PROMPT = "Answer briefly."
TOOL_NAMES = ["calculator"]


def grade(task, answer, trace):
    kind = task.metadata.get("kind")
    if kind == "boom":
        raise RuntimeError("this grader is broken on purpose")
    if kind == "flat":
        return 0.5, "every answer is worth the same"
    words = set(answer.lower().split())
    return min(1.0, len(words) / 40), f"{len(words)} distinct words"


GRADER = grade
"""


def toy_env(root: Path, kinds: list[str]) -> Path:
    """An environment folder for GRPO with the tasks of `kinds` (words, words2, boom, flat)."""
    env = root / "grpo_toy"
    env.mkdir()
    (env / "environment.py").write_text(ENV_PY)
    prompts = {
        "words": "Describe the sea in a few words.",
        "boom": "Name a fruit.",
        "flat": "Say yes.",
        "words2": "Describe a forest.",
    }
    rows = [
        {"id": k, "prompt": prompts[k], "metadata": {"kind": k.rstrip("2")}, "split": "train"}
        for k in kinds
    ]
    (env / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return env


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
    finish_adapter_config(folder, base_dir)
    return folder
