"""Our files work outside selftune: TRL trains on our SFT rows with nothing but the model
folder's own tokenizer and weights, and the loss covers the assistant's tool calls."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from _tuner_fixtures import write_dataset

from agent.model.files import setup_model

# run in a child that imports nothing from selftune: only transformers, datasets and trl
TRL_ON_OUR_ROWS = textwrap.dedent(
    """
    import json, sys
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    model_dir, data, out = sys.argv[1:4]
    assert not any(m.split(".")[0] in ("agent", "tuner", "traces", "tools") for m in sys.modules)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rows = load_dataset("json", data_files=data, split="train")
    args = SFTConfig(
        output_dir=out, max_steps=1, per_device_train_batch_size=2, assistant_only_loss=True,
        bf16=False, gradient_checkpointing=False, report_to=[], save_strategy="no",
        use_cpu=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tok)
    first = trainer.train_dataset[0]
    ids = first["input_ids"]
    trained = tok.decode([i for i, label in zip(ids, first["labels"]) if label != -100])
    loss = trainer.train().training_loss
    print(json.dumps({"trained": trained, "all": tok.decode(ids), "loss": loss}))
    """
)


@pytest.mark.slow
def test_trl_trains_on_our_rows_with_only_the_model_folder(cfg, tmp_path):
    folder = setup_model(cfg, log=lambda _: None)  # installs our template in the folder
    data = write_dataset(tmp_path / "sft", "sft", n=4) / "train.jsonl"
    script = tmp_path / "trl_run.py"
    script.write_text(TRL_ON_OUR_ROWS)
    done = subprocess.run(
        [sys.executable, str(script), str(folder), str(data), str(tmp_path / "out")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # the assistant's tool call and its final answer are trained on; the user turn is not
    assert "<tool_call>" in result["trained"] and '"calculator"' in result["trained"]
    assert "What is" in result["all"] and "What is" not in result["trained"]
    assert result["loss"] > 0


def test_setup_puts_our_template_in_the_model_folder(cfg):
    from transformers import AutoTokenizer

    from agent.model.files import ORIGINAL_TEMPLATE
    from agent.model.template import SELFTUNE_TEMPLATE

    folder = setup_model(cfg, log=lambda _: None)
    assert AutoTokenizer.from_pretrained(str(folder)).chat_template == SELFTUNE_TEMPLATE
    assert "{% generation %}" not in (folder / ORIGINAL_TEMPLATE).read_text()  # SmolLM2's own


# a child with nothing from selftune: PEFT finds the base model from the adapter folder alone
AUTO_PEFT = textwrap.dedent(
    """
    import sys
    from peft import AutoPeftModelForCausalLM
    model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1])
    print(type(model).__name__, model.peft_config["default"].r)
    """
)


def test_peft_loads_our_adapter_folder_with_nothing_but_the_folder(tmp_path, model_path):
    from _tuner_fixtures import real_adapter

    folder = real_adapter(tmp_path / "v1", model_path, r=8)
    script = tmp_path / "auto_peft.py"
    script.write_text(AUTO_PEFT)
    done = subprocess.run(
        [sys.executable, str(script), str(folder)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["PeftModelForCausalLM", "8"]
