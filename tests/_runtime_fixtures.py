"""Shared helpers for the model-runtime tests: the real converted model and small LoRA adapters."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@functools.cache
def require_model() -> Path:
    """The converted SmolLM2 folder in the repo's workspace (.selftune/models), the one every
    test reads; converted once from the embedded GGUF if `selftune setup` has not run."""
    from agent.config import load_config
    from agent.model.files import setup_model

    cfg = load_config(environ={"SELFTUNE_HOME": str(REPO / ".selftune")})
    return setup_model(cfg, log=lambda msg: print(msg, file=sys.stderr))


def make_random_adapter(
    out_dir: Path, *, seed: int = 0, r: int = 16, base_name: str | None = None, scale: float = 1.0
) -> Path:
    """Save a LoRA adapter (all linear layers) with random, non-zero weights, so it visibly
    changes the model's answers. `base_name` overrides the recorded base model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(require_model()))
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(base, cfg)
    if scale != 1.0:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.mul_(scale)
    model.save_pretrained(str(out_dir))
    cfg_file = out_dir / "adapter_config.json"
    data = json.loads(cfg_file.read_text())
    data["base_model_name_or_path"] = base_name or "smollm2-135m-instruct"
    cfg_file.write_text(json.dumps(data, indent=2))
    return out_dir
