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


def record_env_traces(cfg: Config, per_env: int, envs=ROUTE_ENVS) -> int:
    """Run the real agent on the first `per_env` train prompts of each environment, into the
    workspace's real trace store. The model is a scripted one: the classifier learns from the
    prompts the traces hold, not from what was answered, so the real model would only add
    minutes."""
    from _agent_fixtures import Scripted

    from agent.agent import Agent

    async def go() -> int:
        model = Scripted(script=[], seen=[], rest="done")
        n = 0
        async with Agent(cfg, chat_model=model, adapter="base", checkpoints=False) as agent:
            for env in envs:
                for p in env_prompts(env, "train", per_env):
                    res = await agent.run(p, env=env, tools=[])
                    assert res.status == "ok", res.error
                    n += 1
        return n

    return asyncio.run(go())


def write_sft(folder: Path, word: str, n: int = 6) -> Path:
    """A tiny SFT dataset whose every answer is `word`, said three times: distinct per expert."""
    folder.mkdir(parents=True)
    questions = [
        "What is your favourite thing?",
        "Name something.",
        "Say a word.",
        "Tell me about today.",
        "What comes next?",
        "Give me an answer.",
        "Pick one.",
        "What should I remember?",
    ]
    with open(folder / "train.jsonl", "w") as f:
        for q in questions[:n]:
            row = {
                "messages": [
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": f"{word} {word} {word}."},
                ]
            }
            f.write(json.dumps(row) + "\n")
    (folder / "manifest.json").write_text(json.dumps({"kind": "sft", "rows": n, "traces": []}))
    return folder
