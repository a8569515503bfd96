"""Train a LoRA adapter with TRL (SFT, DPO or KTO) on a dataset folder, resumably.

    train("sft", "datasets/calc", base_model_dir=..., out_dir="adapters/new")

A dataset folder holds JSONL rows exactly as TRL reads them (REQUIRED_COLUMNS below) and a
`manifest.json`. The result is a standard PEFT folder (no `modules_to_save`, rank vLLM can
serve) whose `base_model_name_or_path` is the base model's folder, a path that resolves.

Settings chosen on purpose (TRL's defaults are for GPUs): bf16 only where the hardware has it
(`agent.model.hardware`, the rule inference follows too: CPUs without avx512_bf16/amx fail or
crawl), gradient checkpointing only for models of 1B parameters or more (on the 135M model it
cost 1.6x), the loss on assistant tokens only with selftune's chat template (SmolLM2's own has
no `{% generation %}` markers, and TRL then trains on nothing). SFT rows are tokenized here by
`agent.model.template.encode_for_training`, the renderer of the live prompt, and handed to TRL as
token ids: what the model trains on is what it sees when it runs. Checkpoints go to
`<out_dir>.work/` every `save_steps` and at least twice per run (`save_every`); `resume=True`
continues from the last one. Sanity verdicts (tuner/sanity.py) check the data before training
and the loss and the adapter's outputs after it.

Several GPUs: `accelerate launch --config_file tuner/accelerate/fsdp.yaml -m tuner.train ...`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from agent.config import TrainConfig  # the [tuner.train] section of the one config tree
from agent.model.files import ModelError
from agent.model.hardware import pick_device, supports_bf16
from tools.errors import SelftuneError
from tuner.sanity import (
    SanityError,
    dataset_verdicts,
    failed,
    loss_verdict,
    mask_verdict,
    probe_outputs,
    probe_verdict,
    raise_if_failed,
)
from tuner.schemas import TrainKind, TrainResult, Verdict

if TYPE_CHECKING:
    from agent.config import Config
    from tuner.schemas import AdapterRecord

# The columns each trainer reads: TRL's conversational formats, which traces/datasets.py writes.
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "sft": ("messages",),
    "dpo": ("prompt", "chosen", "rejected"),
    "kto": ("prompt", "completion", "label"),
    "cpt": ("text",),  # continued pre-training on documents (tuner/cpt.py)
}
_MODEL_MARKER = "selftune-model.json"
BIG_MODEL_PARAMS = 1_000_000_000
log = logging.getLogger(__name__)


class TrainError(SelftuneError, ValueError):
    """A dataset, model or setting the trainer cannot use; the message says what to do."""


def pick_bf16(cfg: TrainConfig, device: str) -> bool:
    """`cfg.bf16` if set, else the hardware rule inference uses too (agent.model.hardware)."""
    return cfg.bf16 if cfg.bf16 is not None else supports_bf16(device)


def base_model_name(base_model_dir: Path) -> str:
    """The base model's identity: the embedded model's name, else the folder's name."""
    marker = base_model_dir / _MODEL_MARKER
    if marker.is_file():
        try:
            return json.loads(marker.read_text())["name"]
        except (OSError, ValueError, KeyError):
            pass
    return base_model_dir.name


# -- data -------------------------------------------------------------------------------------


def load_rows(kind: TrainKind, dataset_dir: Path) -> list[dict[str, Any]]:
    """The dataset folder's JSONL rows, each exactly as written (`json.loads` per line), checked
    for the kind's columns.

    Not through Arrow: depending on the `datasets` version and on how rows are loaded, Arrow
    unifies dict shapes across rows, and a calculator call's arguments then gain the search
    tool's `query: null`, so the model would train on text it never sees live.
    """
    if kind not in REQUIRED_COLUMNS:
        raise TrainError(
            f"unknown training kind {kind!r}: use one of {', '.join(REQUIRED_COLUMNS)}"
        )
    if not dataset_dir.is_dir():
        raise TrainError(
            f"dataset folder {dataset_dir} does not exist: build it with `selftune data`"
        )
    files = sorted(dataset_dir.glob("*.jsonl"))
    if not files:
        raise TrainError(f"dataset folder {dataset_dir} has no *.jsonl files")
    rows: list[dict[str, Any]] = []
    for path in files:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TrainError(f"{path}:{n} is not a JSON row: {e}") from None
            if not isinstance(row, dict):
                raise TrainError(f"{path}:{n} is a JSON {type(row).__name__}, not an object")
            missing = [c for c in REQUIRED_COLUMNS[kind] if c not in row]
            if missing:
                raise TrainError(
                    f"{dataset_dir} is not a {kind.upper()} dataset: {path.name}:{n} lacks "
                    f"{', '.join(missing)} (it has {', '.join(row) or 'nothing'}); a {kind} row "
                    f"needs {', '.join(REQUIRED_COLUMNS[kind])}"
                )
            rows.append(row)
    if not rows:
        raise TrainError(f"dataset folder {dataset_dir} has no rows")
    return rows


def sft_dataset(
    rows: list[dict[str, Any]],
    tokenizer: Any,
    max_length: int | None,
    trained: list[int] | None = None,
):
    """SFT rows pre-tokenized for TRL: `input_ids` and `assistant_masks` from
    `agent.model.template.encode_for_training` on each row's exact messages and tools (the renderer the
    live prompt comes from), cut to `max_length` tokens. Other columns (`subagent`...) stay out.

    Returns `(dataset, report)`; the report counts rows `truncated` and rows `dropped` because no
    assistant token was left to train on. `trained`, if given, is filled with the tokens each
    row trains (for the loss-mask verdict in tuner/sanity.py).
    """
    import datasets

    from agent.model.template import TemplateError, encode_for_training

    ids: list[list[int]] = []
    masks: list[list[int]] = []
    truncated = dropped = 0
    trained = trained if trained is not None else []
    for i, row in enumerate(rows):
        try:
            # the template chat_template_for picks, as on the live path
            enc = encode_for_training(tokenizer, row["messages"], row.get("tools"))
        except TemplateError as e:
            raise TrainError(f"SFT row {i} cannot be rendered: {e}") from None
        row_ids, mask = enc["input_ids"], enc["assistant_masks"]
        if max_length is not None and len(row_ids) > max_length:
            truncated += 1  # keep the start, like TRL: the prompt and the first turns
            row_ids, mask = row_ids[:max_length], mask[:max_length]
        trained.append(sum(mask))
        if not any(mask):
            dropped += 1
            continue
        ids.append(row_ids)
        masks.append(mask)
    report = {"rows": len(ids), "truncated": truncated, "dropped": dropped}
    # TRL 1.16 takes a dataset with `input_ids` as already tokenized and folds `assistant_masks`
    # into the labels (-100 elsewhere) whatever `assistant_only_loss` says
    return datasets.Dataset.from_dict({"input_ids": ids, "assistant_masks": masks}), report


def cpt_dataset(rows: list[dict[str, Any]], tokenizer: Any, block: int):
    """CPT rows (`{"text"}`) as packed blocks of `block` tokens, every token trained: the same
    `input_ids` + `assistant_masks` columns SFT hands TRL, with the mask all ones."""
    import datasets

    from tuner.cpt import CorpusError, pack_blocks

    try:
        blocks, report = pack_blocks(rows, tokenizer, block)
    except CorpusError as e:
        raise TrainError(str(e)) from None
    if not blocks:
        raise TrainError("the CPT rows hold no tokens: check the corpus the dataset was built from")
    masks = [[1] * len(b) for b in blocks]
    return datasets.Dataset.from_dict({"input_ids": blocks, "assistant_masks": masks}), report


def load_tokenizer(base_model_dir: Path):
    """The base tokenizer with selftune's chat template (tools + generation markers)."""
    from transformers import AutoTokenizer

    from agent.model.template import chat_template_for

    tok = AutoTokenizer.from_pretrained(str(base_model_dir))
    tok.chat_template = chat_template_for(tok)
    if tok.pad_token is None:
        # Padding is masked by the attention mask and -100 labels, never by token id, so the
        # real end-of-turn tokens in the labels stay trained even when pad == eos.
        tok.pad_token = tok.eos_token
    return tok


# -- training ---------------------------------------------------------------------------------


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def total_steps(cfg: TrainConfig, rows: int, world_size: int = 1) -> int:
    """The optimizer steps a run of `rows` rows takes (`max_steps`, else the epochs), counted
    as the HF Trainer counts them."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    batches = math.ceil(rows / (cfg.batch_size * world_size))
    return max(1, math.ceil(cfg.epochs * max(1, batches // cfg.grad_accum)))


def save_every(cfg: TrainConfig, steps: int) -> int:
    """Steps between checkpoints: every `save_steps`, and at least twice per run, so that a
    job killed in the default improve cycle (24 steps, save_steps 25) resumes halfway. A
    one-step run has nothing to resume into: `save_steps` as given."""
    return max(1, min(cfg.save_steps, steps // 2)) if steps >= 2 else cfg.save_steps


def trainer_args(
    kind: TrainKind,
    cfg: TrainConfig,
    work_dir: Path,
    *,
    device: str,
    big: bool,
    steps: int | None = None,
):
    """TRL's config for `kind`, with the settings that work here rather than TRL's GPU defaults.
    `steps`: the run's length (`total_steps`), which checkpoints scale with (`save_every`)."""
    from trl import DPOConfig, KTOConfig, SFTConfig

    bf16 = pick_bf16(cfg, device)
    checkpointing = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else big
    common: dict[str, Any] = dict(
        output_dir=str(work_dir),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=save_every(cfg, steps) if steps else cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=bf16,
        gradient_checkpointing=checkpointing,
        use_cpu=device == "cpu",
        report_to="none",
        disable_tqdm=True,  # our rich bar shows progress and the loss
        dataloader_num_workers=0,
    )
    if kind in ("sft", "cpt"):  # CPT rows are token blocks with every token trained
        return SFTConfig(
            **common,
            # Rows arrive tokenized, cut to max_length and with their assistant mask (sft_dataset);
            # TRL refuses `assistant_only_loss` on tokenized rows and applies the mask column anyway.
            assistant_only_loss=False,
            max_length=None,
            padding_free=cfg.padding_free,
        )
    if kind == "dpo":
        return DPOConfig(**common, beta=cfg.beta, max_length=cfg.max_length)
    return KTOConfig(**common, beta=cfg.beta, max_length=cfg.max_length)


def _progress_callback():
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from transformers import TrainerCallback

    class LossProgress(TrainerCallback):
        """A rich progress bar whose text shows the latest training loss."""

        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            self.bar = Progress(
                TextColumn("[bold blue]training"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} steps"),
                TextColumn("loss {task.fields[loss]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
            )
            self.task = self.bar.add_task("train", total=state.max_steps, loss="-")
            self.bar.update(self.task, completed=state.global_step)
            self.bar.start()

        def on_step_end(self, args, state, control, **kwargs):
            if hasattr(self, "bar"):
                self.bar.update(self.task, completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if hasattr(self, "bar") and logs and "loss" in logs:
                self.bar.update(self.task, loss=f"{logs['loss']:.4f}")

        def on_train_end(self, args, state, control, **kwargs):
            if hasattr(self, "bar"):
                self.bar.stop()

    return LossProgress()


_CHECKPOINT_FILES = ("trainer_state.json", "adapter_model.safetensors", "optimizer.pt")


def last_checkpoint(work_dir: Path) -> str | None:
    """The newest complete checkpoint in `work_dir` (a job killed while saving leaves a partial
    one behind, which resuming from would fail), or None."""
    if not work_dir.is_dir():
        return None
    done = [
        p
        for p in work_dir.glob("checkpoint-*")
        if p.name.split("-")[-1].isdigit() and all((p / f).is_file() for f in _CHECKPOINT_FILES)
    ]
    return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None


def build_trainer(
    kind: TrainKind,
    dataset_dir: Path | str,
    *,
    base_model_dir: Path | str,
    work_dir: Path | str,
    parent_adapter_dir: Path | str | None = None,
    config: TrainConfig | None = None,
):
    """The TRL trainer for `kind`, ready to `train()`: rows loaded and tokenized, LoRA attached
    (fresh, or the parent's weights loaded trainable), checkpoints going to `work_dir`.
    `trainer.row_report` counts the rows used, and for SFT those truncated or dropped;
    `trainer.verdicts` holds the sanity verdicts on the data (tuner/sanity.py), checked before
    the model loads: a failed one raises SanityError and nothing is trained."""
    import datasets
    import torch
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl import DPOTrainer, KTOTrainer

    cfg = config or TrainConfig()
    base_dir = Path(base_model_dir)
    if not (base_dir / "config.json").is_file():
        raise TrainError(f"base model folder {base_dir} has no config.json: run `selftune setup`")
    rows = load_rows(kind, Path(dataset_dir))
    tok = load_tokenizer(base_dir)
    if kind == "sft":
        trained: list[int] = []
        train_rows, report = sft_dataset(rows, tok, cfg.max_length, trained)
    elif kind == "cpt":
        train_rows, report = cpt_dataset(rows, tok, cfg.cpt_block)
    else:
        # Limitation: DPO/KTO rows still go through Arrow and TRL renders them itself (with the
        # same template, but without normalize_messages: string arguments stay verbatim).
        # datasets 5.x keeps differing dict shapes as its Json type here, so no nulls appear
        # (tests/test_train_parity.py checks the prompts); older versions unified them.
        files = sorted(str(p) for p in Path(dataset_dir).glob("*.jsonl"))
        try:
            train_rows = datasets.load_dataset("json", data_files=files, split="train")
        except Exception as e:  # noqa: BLE001 - datasets raises many kinds for rows it cannot type
            raise TrainError(
                f"Arrow cannot hold the {kind.upper()} rows in {dataset_dir}: {e}"
            ) from None
        report = {"rows": len(rows), "truncated": 0, "dropped": 0}
    verdicts = dataset_verdicts(
        rows,
        Path(dataset_dir),
        max_duplicate_share=cfg.max_duplicate_share,
        # a corpus's rows are chunks of documents, not tasks: one long document may hold most
        max_task_share=1.0 if kind == "cpt" else cfg.max_task_share,
    )
    if kind == "sft":  # DPO and KTO rows are masked by TRL, from prompt and completion
        verdicts.insert(0, mask_verdict(trained, cfg.max_empty_mask_share))
    raise_if_failed(verdicts, f"{dataset_dir} stopped before training")
    if report["truncated"] or report["dropped"]:
        log.warning(
            "%d of %d rows were cut to max_length=%d tokens; %d dropped (no assistant token left)",
            report["truncated"],
            len(rows),
            cfg.max_length,
            report["dropped"],
        )
    try:
        device = pick_device(cfg.device, setting="[tuner.train] device")
    except ModelError as e:
        raise TrainError(str(e)) from None
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    big = model.num_parameters() >= BIG_MODEL_PARAMS
    if parent_adapter_dir is not None:
        parent = Path(parent_adapter_dir)
        if not (parent / "adapter_config.json").is_file():
            raise TrainError(f"parent adapter {parent} has no adapter_config.json")
        model = PeftModel.from_pretrained(model, str(parent), is_trainable=True)
        # the parent names its base by name; saving would look that name up on the hub to see
        # whether the vocabulary changed. Point it at the local folder (the saved adapter's
        # config gets the name back in finish_adapter_config).
        for peft_cfg in model.peft_config.values():
            peft_cfg.base_model_name_or_path = str(base_dir)
    else:
        model = get_peft_model(model, lora_config(cfg))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    steps = total_steps(cfg, len(train_rows), world)
    args = trainer_args(kind, cfg, Path(work_dir), device=device, big=big, steps=steps)
    sft = _sft_trainer_class()
    trainer_cls = {"sft": sft, "cpt": sft, "dpo": DPOTrainer, "kto": KTOTrainer}[kind]
    trainer = trainer_cls(model=model, args=args, train_dataset=train_rows, processing_class=tok)
    if kind in ("sft", "cpt"):  # the same trainer class; CPT blocks share no start, and
        # dropout would draw one mask for a shared prefix
        trainer.share_prefix = kind == "sft" and cfg.share_prefix and not cfg.lora_dropout
    trainer.row_report = report
    trainer.verdicts = verdicts
    return trainer


def train_in_subprocess(kind: TrainKind, dataset_dir: Path | str, **kwargs: Any) -> TrainResult:
    """`train(...)` in a fresh process, for callers that hold a model for inference.

    Measured in the improve job: the same 18 SFT steps took 17.9 s each inside the process that
    had been generating (its OpenMP threads and memory stay around) against 10.5 s in a process
    of its own. The child dies with its parent (PR_SET_PDEATHSIG), so a killed job never
    leaves a trainer writing checkpoints behind; its errors come back as TrainError."""
    import multiprocessing
    import tempfile

    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="selftune-train-") as tmp:
        result_file = Path(tmp) / "result.json"
        proc = ctx.Process(
            target=_train_child, args=(kind, str(dataset_dir), kwargs, str(result_file))
        )
        proc.start()
        try:
            proc.join()
        except BaseException:
            proc.kill()
            proc.join()
            raise
        if not result_file.is_file():
            raise TrainError(
                f"the training process ended with exit code {proc.exitcode} and no result "
                "(killed, or out of memory?): run the step again; it resumes from its last "
                "checkpoint"
            )
        data = json.loads(result_file.read_text())
    if "error" in data:
        if "verdicts" in data:
            raise SanityError(data["error"], [Verdict(**v) for v in data["verdicts"]])
        raise TrainError(data["error"])
    return TrainResult(
        adapter_dir=Path(data["adapter_dir"]),
        metrics=data["metrics"],
        config=TrainConfig(**data["config"]),
        verdicts=[Verdict(**v) for v in data["verdicts"]],
    )


def _train_child(kind: str, dataset_dir: str, kwargs: dict, result_file: str) -> None:
    try:  # die with the parent: a killed job must not leave a trainer running
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    try:
        res = train(kind, dataset_dir, **kwargs)
        out = {
            "adapter_dir": str(res.adapter_dir),
            "metrics": res.metrics,
            "config": res.config.model_dump(mode="json"),
            "verdicts": [v.model_dump() for v in res.verdicts],
        }
    except SanityError as e:
        out = {"error": str(e), "verdicts": [v.model_dump() for v in e.verdicts]}
    except TrainError as e:
        out = {"error": str(e)}
    Path(result_file).write_text(json.dumps(out, default=str))


def _sft_trainer_class():
    """TRL's SFTTrainer, with the LM head applied only where the loss needs it.

    TRL's SFT loss runs the LM head (49k x 576 on SmolLM2) at every position and adds entropy
    and accuracy metrics over them, although only the assistant tokens (about a sixth of an
    agent row: the rest is the system prompt, tool schemas, the task and tool results) are
    trained. Here the model returns logits only for the columns where some row of the batch has
    a trained next token (`logits_to_keep`), and the loss is the same token-mean cross entropy.
    The rows of a batch that start alike (a role's system prompt and tool schemas) run their
    common start once (tuner/prefix.py). Measured by `python -m benchmarks.bench_tuner`;
    tests/test_train.py checks the loss and its gradient equal the full computation."""
    import torch
    from trl import SFTTrainer

    from tuner import prefix

    class SelectiveHeadSFTTrainer(SFTTrainer):
        share_prefix = True  # build_trainer sets [tuner.train] share_prefix (tuner/prefix.py)
        shared_tokens = 0  # the last batch's tokens not computed again (tests read it)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids, labels = inputs["input_ids"], inputs["labels"]
            mask = inputs.get("attention_mask")  # none when padding_free
            trains = bool((labels[:, 1:] != -100).any())
            if self.share_prefix and mask is not None and trains and not return_outputs:
                parts = prefix.groups(ids, mask, labels)
            else:
                parts = [prefix.Group(torch.arange(len(ids), device=ids.device), ids.shape[1], 0)]
            self.shared_tokens = sum(g.shared * (len(g.rows) - 1) for g in parts)
            total, n_trained, right, out = 0.0, 0, 0, None
            for g in parts:
                targets = labels[g.rows, 1 : g.width]
                cols = (targets != -100).any(dim=0).nonzero().squeeze(-1)
                if cols.numel() == 0:
                    if len(parts) > 1:
                        continue  # these rows train nothing; the others carry the graph
                    cols = torch.zeros(1, dtype=torch.long, device=labels.device)  # keep a zero
                if len(parts) == 1 and not g.shared:  # the whole batch plainly, every input
                    forward = {k: v for k, v in inputs.items() if k != "labels"}
                    out = model(**forward, use_cache=False, logits_to_keep=cols)
                else:
                    out = prefix.forward(
                        model, ids[g.rows, : g.width], mask[g.rows, : g.width], cols, g.shared
                    )
                logits = out.logits.float()
                kept = targets[:, cols]
                total = total + torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]),
                    kept.reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                )
                n_trained += int((kept != -100).sum())
                with torch.no_grad():
                    right += int(((logits.argmax(-1) == kept) & (kept != -100)).sum())
            denominator = n_trained if num_items_in_batch is None else num_items_in_batch
            loss = total / torch.as_tensor(denominator, device=labels.device).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            mode = "train" if model.training else "eval"
            if n_trained > 0:
                self._metrics[mode]["mean_token_accuracy"].append(right / n_trained)
            return (loss, out) if return_outputs else loss

    return SelectiveHeadSFTTrainer


def train(
    kind: TrainKind,
    dataset_dir: Path | str,
    *,
    base_model_dir: Path | str,
    out_dir: Path | str,
    parent_adapter_dir: Path | str | None = None,
    config: TrainConfig | None = None,
    resume: bool | Literal["auto"] = False,
    progress: bool = True,
    base_model: str | None = None,
) -> TrainResult:
    """Train a LoRA adapter of `kind` on `dataset_dir` and write it to `out_dir` (a new folder).

    With `parent_adapter_dir` the parent's LoRA weights are loaded trainable and trained further;
    otherwise a fresh LoRA goes on the base model. `config` is the `[tuner.train]` section
    (default: its defaults). `resume` continues from the last checkpoint in `<out_dir>.work/` (an
    error if there is none); `resume="auto"` continues if there is one and starts fresh if not.
    `base_model` is the name written into adapter_config.json (default: the model's name).
    The folder appears complete or not at all (written beside it, then renamed).

    Sanity verdicts (tuner/sanity.py): the data's are checked before training (a failed one
    raises SanityError and nothing is trained); the loss's and the probe's (the adapter against
    where it started) come back in `TrainResult.verdicts` for the caller to act on (`tune`
    stops on a failed one).
    """
    from transformers import PrinterCallback

    cfg = config or TrainConfig()
    out = Path(out_dir)
    if out.exists():
        raise TrainError(f"{out} already exists: choose a new output folder or delete it")
    work_dir = out.with_name(out.name + ".work")
    checkpoint = last_checkpoint(work_dir) if resume else None
    if resume is True and checkpoint is None:
        raise TrainError(f"nothing to resume: {work_dir} holds no checkpoint; run without --resume")
    if checkpoint is None and work_dir.exists():
        shutil.rmtree(work_dir)  # a fresh start must not pick up an old job's checkpoints

    trainer = build_trainer(
        kind,
        dataset_dir,
        base_model_dir=base_model_dir,
        work_dir=work_dir,
        parent_adapter_dir=parent_adapter_dir,
        config=cfg,
    )
    args, rows, base_dir = trainer.args, trainer.train_dataset, Path(base_model_dir)
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; the bar shows the loss
    if progress:
        trainer.add_callback(_progress_callback())

    # where the adapter starts (its parent, or the base model under a fresh LoRA), for the probe;
    # several processes would each need the sharded model, so the probe runs only in one
    single = trainer.args.world_size == 1
    before = probe_outputs(trainer.model, trainer.processing_class) if single else None
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=checkpoint)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    verdicts = [*trainer.verdicts, loss_verdict(losses, cfg.min_loss_drop)]
    if before is not None:
        # compared as `before` was taken: without the bf16 autocast wrapper that accelerate put
        # on forward for training (under it an unchanged adapter moved by 0.9 on avx512_bf16)
        model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
        after = probe_outputs(model, trainer.processing_class)
        verdicts.append(probe_verdict(before, after, cfg.probe_min_change))
    metrics: dict[str, Any] = {
        "kind": kind,
        "global_step": output.global_step,
        "train_loss": output.training_loss,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "losses": losses,
        "rows": len(rows),
        "rows_truncated": trainer.row_report["truncated"],
        "rows_dropped": trainer.row_report["dropped"],
        "device": "cpu" if args.use_cpu else "cuda",
        "bf16": bool(args.bf16),
        "gradient_checkpointing": bool(args.gradient_checkpointing),
        "resumed_from": Path(checkpoint).name if checkpoint else None,
        "wall_s": round(time.perf_counter() - started, 2),
    }

    # under `accelerate launch` every rank runs this: all take part in gathering the weights,
    # rank 0 alone writes the folder
    tmp = out.with_name(f".{out.name}.tmp")
    if trainer.is_world_process_zero():
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_model(str(tmp))
    if trainer.is_world_process_zero():
        finish_adapter_config(tmp, base_dir)
        # the tokenizer and chat_template.jinja stay: they record what the adapter was trained
        # on; the pickled TrainingArguments go (train_config.json says the same, readably)
        (tmp / "training_args.bin").unlink(missing_ok=True)
        (tmp / "train_metrics.json").write_text(json.dumps(metrics, indent=2))
        (tmp / "train_config.json").write_text(cfg.model_dump_json(indent=2))
        os.replace(tmp, out)
        shutil.rmtree(work_dir, ignore_errors=True)
    return TrainResult(adapter_dir=out, metrics=metrics, config=cfg, verdicts=verdicts)


def finish_adapter_config(folder: Path, base: Path | str) -> None:
    """Record the base model in a saved adapter folder as a path that resolves (the model
    folder, absolute), so PEFT's AutoPeftModelForCausalLM loads the adapter with nothing from
    selftune; refuse one that saves whole modules (vLLM cannot serve it). GRPO's checkpoints
    go through it too."""
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    if data.get("modules_to_save"):
        raise TrainError(
            f"the adapter would save whole modules {data['modules_to_save']}; vLLM cannot serve it"
        )
    local = Path(base).expanduser()
    data["base_model_name_or_path"] = str(local.resolve()) if local.is_dir() else str(base)
    path.write_text(json.dumps(data, indent=2))


def tune(
    kind: TrainKind,
    dataset_dir: Path | str,
    cfg: Config,
    *,
    from_version: str | None = None,
    config: TrainConfig | None = None,
    resume: bool | Literal["auto"] = False,
    out_dir: Path | str | None = None,
    isolated: bool = False,
    notes: Sequence[str] = (),
    progress: bool = True,
) -> AdapterRecord:
    """Train on `dataset_dir` with the workspace's model, then register the adapter as the next
    candidate version: the one train-and-register path (`selftune tune`, the improve job).

    `config` defaults to `[tuner.train]`; `from_version` continues that registry version's
    adapter. The adapter is written to `out_dir` (default `<workspace>/jobs/tune-<kind>-<dataset>/
    adapter`), so `resume` finds a killed job's checkpoints beside it. `isolated` trains in a
    process of its own (for a caller that holds a model for inference). Returns the new
    AdapterRecord (status `candidate`: the eval gate decides the rest), its sanity verdicts in
    `verdicts`. A failed verdict raises SanityError: before training nothing is registered;
    after it the adapter is registered with its verdicts and rejected, so the record says why.
    """
    from agent.model.files import model_dir, resolve_model
    from tuner.registry import open_registry

    dataset_dir = Path(dataset_dir).resolve()
    config = config or cfg.tuner.train
    registry = open_registry(cfg)
    # a damaged parent (truncated or altered weights) is refused by name, not trained on
    parent = registry.verify(from_version) if from_version else None
    base_name = resolve_model(cfg).name
    if parent is not None and parent.base_model != base_name:
        raise TrainError(
            f"{from_version} was trained on {parent.base_model}, not on the configured model "
            f"{base_name}: set [model] name = {parent.base_model!r} or train from the base"
        )
    if out_dir is None:
        job = cfg.workspace.jobs / f"tune-{kind}-{dataset_dir.name}"
        job.mkdir(parents=True, exist_ok=True)
        out_dir = job / "adapter"
    out = Path(out_dir)
    if out.exists():  # a finished job that was never registered (e.g. killed in between)
        shutil.rmtree(out)
    result = (train_in_subprocess if isolated else train)(
        kind,
        dataset_dir,
        base_model_dir=model_dir(cfg),
        out_dir=out,
        parent_adapter_dir=parent.path if parent else None,
        config=config,
        resume=resume,
        progress=progress,
        base_model=base_name,
    )
    manifest = dataset_dir / "manifest.json"
    rec = registry.register(
        result.adapter_dir,
        base_model=base_name,
        parent=from_version,
        dataset_manifest=manifest if manifest.is_file() else None,
        train_config={"kind": kind, **config.model_dump()},
        metrics=result.metrics,
        notes=list(notes),
        verdicts=result.verdicts,
    )
    if failed(result.verdicts):
        why = "; ".join(f"{v.name}: {v.message}" for v in failed(result.verdicts))
        registry.reject(rec.version)
        registry.add_note(rec.version, f"rejected by the sanity verdicts: {why}")
        raise_if_failed(
            result.verdicts, f"{rec.version} (registered as rejected) stopped before the gate"
        )
    return rec


# -- command line (also what `accelerate launch -m tuner.train` runs) -------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tuner.train", description=__doc__.split("\n")[0]
    )
    parser.add_argument("kind", choices=sorted(REQUIRED_COLUMNS))
    parser.add_argument("dataset_dir", type=Path)
    parser.add_argument("--base-model-dir", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--parent-adapter-dir", type=Path)
    parser.add_argument("--config-json", help="[tuner.train] keys as a JSON object")
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--save-steps", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    ns = parser.parse_args(argv)
    try:
        base = json.loads(ns.config_json) if ns.config_json else {}
        cfg = TrainConfig.model_validate(base).updated(
            max_steps=ns.max_steps, save_steps=ns.save_steps
        )
        result = train(
            ns.kind,
            ns.dataset_dir,
            base_model_dir=ns.base_model_dir,
            out_dir=ns.out_dir,
            parent_adapter_dir=ns.parent_adapter_dir,
            config=cfg,
            resume=ns.resume,
            progress=not ns.no_progress,
        )
    except (TrainError, SanityError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    verdicts = [v.model_dump() for v in result.verdicts]
    print(
        json.dumps({"adapter_dir": str(result.adapter_dir), **result.metrics, "verdicts": verdicts})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
