"""Traces of several environments for the route classifier, and the tiny experts it routes to."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from agent.config import Config

ROUTE_ENVS = ("calculator", "docs-qa", "delegate")


def env_prompts(env: str, split: str, n: int | None = None) -> list[str]:
    """The first `n` task prompts of a built-in environment's `split`."""
    from agent.envs import load_environment

    prompts = [t.prompt for t in load_environment(env).tasks if t.split == split]
    return prompts[:n]


def record_env_traces(cfg: Config, per_env: int, envs=ROUTE_ENVS, engine=None) -> int:
    """Run the real agent on the first `per_env` train prompts of each environment, into the
    workspace's real trace store. The model is a scripted one: the classifier learns from the
    prompts the traces hold, not from what was answered, so the real model would only add
    minutes."""
    from _agent_fixtures import Scripted

    from agent.agent import Agent

    async def go() -> int:
        model = Scripted(script=[], seen=[], rest="done")
        n = 0
        async with Agent(
            cfg, engine=engine, chat_model=model, adapter="base", checkpoints=False
        ) as agent:
            for env in envs:
                for p in env_prompts(env, "train", per_env):
                    res = await agent.run(p, env=env, tools=[])
                    assert res.status == "ok", res.error
                    n += 1
        return n

    return asyncio.run(go())


SYSTEM = "Answer briefly."


def write_sft(folder: Path, word: str, n: int = 2) -> Path:
    """A tiny SFT dataset whose every answer is `word`, said three times: distinct per expert.
    Short rows (about 30 tokens): a training step costs seconds, not minutes, on a loaded CPU."""
    folder.mkdir(parents=True)
    questions = ["Say something.", "Name a thing.", "Say a word.", "Pick one."]
    with open(folder / "train.jsonl", "w") as f:
        for q in questions[:n]:
            row = {
                "messages": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": f"{word} {word} {word}."},
                ]
            }
            f.write(json.dumps(row) + "\n")
    (folder / "manifest.json").write_text(json.dumps({"kind": "sft", "rows": n, "traces": []}))
    return folder


def train_experts(
    base_dir: Path, datasets: dict[str, Path], out: Path, steps: int = 4, lr: float = 3e-3
) -> dict[str, Path]:
    """A real LoRA per dataset, each trained for `steps` full-batch AdamW steps on its SFT
    rows, the loss on the assistant tokens that selftune's training template marks, saved as
    a PEFT folder the registry accepts. The same pieces as `tuner.train` (LoRA config,
    template, tokenizer) on one loaded base model, without TRL's set-up, checkpoints and
    probes, which cost minutes each on a loaded 2-core CPU."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from agent.config import TrainConfig
    from agent.model.template import encode_for_training
    from tuner.train import finish_adapter_config, load_tokenizer, lora_config

    tok = load_tokenizer(base_dir)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    folders = {}
    for name, dataset in datasets.items():
        torch.manual_seed(0)
        rows = [json.loads(line) for line in (dataset / "train.jsonl").read_text().splitlines()]
        enc = [encode_for_training(tok, r["messages"]) for r in rows]
        width = max(len(e["input_ids"]) for e in enc)
        ids = torch.full((len(enc), width), tok.pad_token_id)
        labels = torch.full((len(enc), width), -100)
        attention = torch.zeros((len(enc), width), dtype=torch.long)
        for i, e in enumerate(enc):
            n = len(e["input_ids"])
            ids[i, :n] = torch.tensor(e["input_ids"])
            attention[i, :n] = 1
            mask = torch.tensor(e["assistant_masks"], dtype=torch.bool)
            labels[i, :n] = torch.where(mask, ids[i, :n], torch.tensor(-100))
        model = get_peft_model(base, lora_config(TrainConfig(lora_r=8)))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        model.train()
        losses = []
        for _ in range(steps):
            loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[-1] < losses[0] / 2, losses  # it learned its rows
        folders[name] = out / name
        model.save_pretrained(str(folders[name]))
        finish_adapter_config(folders[name], base_dir)
        base = model.unload()  # the LoRA layers out, the base weights untouched
        base.eval()
    return folders
