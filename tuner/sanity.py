"""Training sanity verdicts: the checks that catch a tune that learned nothing, before the gate.

Runs that train on nothing look like any other run until the gate happens to reject them: a loss
mask with no token in it, a dataset that is one task repeated, a loss that never moved, an
adapter whose outputs equal its parent's, a GRPO run whose groups all had equal rewards. Each
check here is a named `Verdict` (name, ok, value, threshold, message) stored in the adapter's
registry record; a failed one stops the tune with a `SanityError` saying what happened and what
to try, before any episode of the gate is paid for.

Before training (on the tokenized rows, before the model loads):
- `loss_mask`: rows whose loss mask trains no token (no assistant turn, or all of it cut off
  by `max_length`) are named and left out, so every batch trains at least one token; none
  left, or more than `max_empty_mask_share` of them, stops.
- `duplicates`: the share of rows that repeat an earlier row exactly.
- `task_share`: the share of rows from the commonest task (task ids from the dataset's
  manifest, as `traces/datasets.py` writes it).

After training:
- `loss_down`: the median of the last quarter of the logged losses against the median of the
  first quarter. Medians of quarters, not the first and last loss: with 24 steps of batch 8 a
  single step's loss swings by a third between batches, while the quarter medians of a run
  that learns differ by far more. Fewer than 4 logged losses: too few to judge (passes, and
  says so); a first quarter already below `FITTED_LOSS` passes too (a parent that already fits
  its data has little left to lose).
- `probe_changed`: the next-token log-probabilities on a few fixed prompts (`PROBE`), the
  adapter against where it started (its parent, or the base model for a fresh LoRA). An
  identical adapter (0 steps, a learning rate that rounds to nothing, a frozen LoRA) moves
  them by exactly 0.
- GRPO: `grpo_skipped`, the share of groups skipped for all-equal rewards over the run, and
  `grpo_kl`, the mean KL per token to the start adapter in the last step (measured only with
  `beta` > 0).
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tools.errors import SelftuneError
from tuner.schemas import Verdict

FITTED_LOSS = 0.05  # a first-quarter median below this: the data is already learned
_SHOWN = 5  # rows or tasks named in a message

# Fixed prompts: a tool task, plain chat, and a question, as the live agent renders them.
_CALC_TOOL = {
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
PROBE: list[tuple[list[dict[str, Any]], list[dict[str, Any]] | None]] = [
    ([{"role": "user", "content": "What is 48 + 97?"}], [_CALC_TOOL]),
    ([{"role": "user", "content": "How many minutes are in 3 hours?"}], [_CALC_TOOL]),
    ([{"role": "user", "content": "What is the capital of France?"}], None),
    ([{"role": "user", "content": "Write one sentence about the sea."}], None),
]
PROBE_NEW_TOKENS = 6


class SanityError(SelftuneError, RuntimeError):
    """A sanity verdict failed: the tune learned (or would learn) nothing worth gating."""

    def __init__(self, message: str, verdicts: Sequence[Verdict] = ()):
        super().__init__(message)
        self.verdicts = list(verdicts)


def failed(verdicts: Sequence[Verdict]) -> list[Verdict]:
    return [v for v in verdicts if not v.ok]


def raise_if_failed(verdicts: Sequence[Verdict], when: str) -> None:
    """SanityError naming each failed verdict and what to try, if any failed."""
    bad = failed(verdicts)
    if bad:
        raise SanityError(f"{when}: " + " | ".join(f"{v.name}: {v.message}" for v in bad), verdicts)


def _names(items: Sequence[Any]) -> str:
    shown = ", ".join(str(i) for i in items[:_SHOWN])
    return shown + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


# -- before training --------------------------------------------------------------------------


def mask_verdict(trained_tokens: Sequence[int], max_empty_share: float) -> Verdict:
    """`trained_tokens[i]`: tokens row i's loss mask trains (after `max_length`)."""
    n = len(trained_tokens)
    empty = [i for i, t in enumerate(trained_tokens) if t == 0]
    share = len(empty) / n if n else 1.0
    if n and not empty:
        return Verdict(
            name="loss_mask",
            ok=True,
            value=0.0,
            threshold=max_empty_share,
            message=f"all {n} rows train at least {min(trained_tokens)} tokens",
        )
    if len(empty) == n:
        msg = (
            f"the loss mask of all {n} rows is empty, so training would learn nothing: the rows "
            "need assistant turns within [tuner.train] max_length (raise it if the prompts are "
            "long; check that the dataset was built from traces the model answered)"
        )
        return Verdict(
            name="loss_mask", ok=False, value=share, threshold=max_empty_share, message=msg
        )
    ok = share <= max_empty_share
    msg = (
        f"{len(empty)} of {n} rows train no token (rows {_names(empty)}, counting from 0 in "
        "file order: no assistant turn "
        "within [tuner.train] max_length) and are left out; every batch trains the others"
    )
    if not ok:
        msg += (
            f". That is over max_empty_mask_share={max_empty_share}: raise max_length, or "
            "rebuild the dataset from traces with assistant turns"
        )
    return Verdict(name="loss_mask", ok=ok, value=share, threshold=max_empty_share, message=msg)


def _canonical(row: dict[str, Any]) -> str:
    return json.dumps(row, sort_keys=True, ensure_ascii=False)


def duplicate_verdict(rows: Sequence[dict[str, Any]], max_share: float) -> Verdict:
    seen: dict[str, int] = {}
    repeats: list[int] = []
    for i, row in enumerate(rows):
        key = _canonical(row)
        if key in seen:
            repeats.append(i)
        else:
            seen[key] = i
    share = len(repeats) / len(rows) if rows else 0.0
    ok = share <= max_share
    if not repeats:
        msg = f"no duplicate among {len(rows)} rows"
    else:
        msg = f"{len(repeats)} of {len(rows)} rows repeat an earlier row (rows {_names(repeats)})"
        if not ok:
            msg += (
                f", over max_duplicate_share={max_share}: the model would memorise a few "
                "answers. Rebuild the dataset with best_of_n, collect more distinct tasks, or "
                "raise [tuner.train] max_duplicate_share"
            )
    return Verdict(name="duplicates", ok=ok, value=share, threshold=max_share, message=msg)


def row_tasks(dataset_dir: Path, n_rows: int) -> list[str] | None:
    """Each row's task ("env:task_id") from the dataset's manifest, or None when it does not
    say (a hand-written dataset, or one built before manifests carried task ids)."""
    try:
        manifest = json.loads((dataset_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    sources = manifest.get("row_sources") if isinstance(manifest, dict) else None
    if not isinstance(sources, list) or len(sources) != n_rows:
        return None
    tasks = [s.get("task_id") if isinstance(s, dict) else None for s in sources]
    if any(t is None for t in tasks):
        return None
    return [f"{s.get('env') or ''}:{t}" for s, t in zip(sources, tasks, strict=True)]


def task_share_verdict(tasks: Sequence[str] | None, max_share: float) -> Verdict:
    if not tasks:
        return Verdict(
            name="task_share",
            ok=True,
            threshold=max_share,
            message="not measured: the dataset's manifest names no task per row",
        )
    (top, count), distinct = Counter(tasks).most_common(1)[0], len(set(tasks))
    share = count / len(tasks)
    ok = share <= max_share
    msg = f"the commonest task {top} has {count} of {len(tasks)} rows ({distinct} tasks)"
    if not ok:
        msg += (
            f", over max_task_share={max_share}: the adapter would learn that one task. "
            "Collect more tasks (--collect-limit), keep one row per task (best_of_n), or raise "
            "[tuner.train] max_task_share if the environment really has few tasks"
        )
    return Verdict(name="task_share", ok=ok, value=share, threshold=max_share, message=msg)


def dataset_verdicts(
    rows: Sequence[dict[str, Any]],
    dataset_dir: Path,
    *,
    max_duplicate_share: float,
    max_task_share: float,
) -> list[Verdict]:
    return [
        duplicate_verdict(rows, max_duplicate_share),
        task_share_verdict(row_tasks(dataset_dir, len(rows)), max_task_share),
    ]


# -- after training ---------------------------------------------------------------------------


def loss_verdict(losses: Sequence[float], min_drop: float) -> Verdict:
    """The median of the last quarter of `losses` below the first quarter's by `min_drop`
    (relative). See the module docstring for why quarters and medians."""
    losses = [float(x) for x in losses]
    if any(not math.isfinite(x) for x in losses):
        return Verdict(
            name="loss_down",
            ok=False,
            threshold=min_drop,
            message="the loss became NaN or infinite: lower [tuner.train] learning_rate",
        )
    if len(losses) < 4:
        return Verdict(
            name="loss_down",
            ok=True,
            threshold=min_drop,
            message=f"not judged: {len(losses)} logged losses (need 4 or more)",
        )
    q = len(losses) // 4
    first, last = statistics.median(losses[:q]), statistics.median(losses[-q:])
    drop = (first - last) / first if first > 0 else 0.0
    if first < FITTED_LOSS:
        return Verdict(
            name="loss_down",
            ok=True,
            value=drop,
            threshold=min_drop,
            message=f"the loss started at {first:.4f}, already fitted (under {FITTED_LOSS})",
        )
    ok = drop > min_drop
    msg = f"median loss of the first {q} steps {first:.4f}, of the last {q} {last:.4f}"
    if not ok:
        msg += (
            f": it did not go down (relative drop {drop:.1%}, need over {min_drop:.1%}). "
            "Try a higher [tuner.train] learning_rate or more steps (epochs), and check that "
            "the rows are consistent"
        )
    return Verdict(name="loss_down", ok=ok, value=drop, threshold=min_drop, message=msg)


def probe_outputs(model: Any, tokenizer: Any) -> dict[str, Any]:
    """The model's next-token log-probabilities and greedy continuation on each `PROBE` prompt
    (a few forward passes; the model is left in the mode it was in)."""
    import torch

    from agent.model.template import encode_prompt

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logprobs, tokens = [], []
    try:
        with torch.no_grad():
            for messages, tools in PROBE:
                ids = torch.tensor([encode_prompt(tokenizer, messages, tools)], device=device)
                logits = model(input_ids=ids).logits[0, -1].float()
                logprobs.append(torch.log_softmax(logits, -1).cpu())
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=PROBE_NEW_TOKENS,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
                tokens.append(out[0, ids.shape[1] :].tolist())
    finally:
        model.train(was_training)
    return {"logprobs": logprobs, "tokens": tokens}


def probe_verdict(before: dict[str, Any], after: dict[str, Any], min_change: float) -> Verdict:
    """Did the adapter move its outputs away from where it started? `value` is the largest
    change of a next-token log-probability over the probe prompts."""
    change = max(
        float((a - b).abs().max())
        for a, b in zip(after["logprobs"], before["logprobs"], strict=True)
    )
    differ = sum(a != b for a, b in zip(after["tokens"], before["tokens"], strict=True))
    ok = change > min_change
    msg = (
        f"next-token log-probabilities moved by up to {change:.3g} on {len(PROBE)} probe "
        f"prompts; greedy output differs on {differ}"
    )
    if not ok:
        msg += (
            f": the adapter answers like its parent (change {change:.3g}, need over "
            f"{min_change:g}). Check that training ran steps (max_steps, epochs) with a "
            "learning rate that is not ~0, and that the loss mask has tokens"
        )
    return Verdict(name="probe_changed", ok=ok, value=change, threshold=min_change, message=msg)


def probe_against_folder(model: Any, tokenizer: Any, adapter_dir: Path) -> dict[str, Any]:
    """`probe_outputs` of the PEFT `model` with the adapter in `adapter_dir` loaded in place of
    its own for the moment (the run's start adapter, to compare the trained one with)."""
    name = "sanity-start"
    current = model.active_adapter
    model.load_adapter(str(adapter_dir), adapter_name=name)
    try:
        model.set_adapter(name)
        return probe_outputs(model, tokenizer)
    finally:
        model.set_adapter(current)
        model.delete_adapter(name)


def grpo_verdicts(log: Sequence[dict[str, Any]], max_skipped: float, max_kl: float, beta: float):
    """`grpo_skipped` and `grpo_kl` from a GRPO run's step logs (`tuner.grpo.StepLog`)."""
    groups = sum(s["groups"] for s in log)
    skipped = sum(s["skipped_groups"] for s in log)
    share = skipped / groups if groups else 1.0
    ok = share <= max_skipped
    msg = f"{skipped} of {groups} groups skipped for all-equal rewards"
    if not ok:
        msg += (
            f", over max_skipped_share={max_skipped}: almost no group carried a signal. The "
            "tasks are all too easy or all too hard for the policy: raise group_size or "
            "temperature, or train on another split or environment first (SFT)"
        )
    verdicts = [
        Verdict(name="grpo_skipped", ok=ok, value=share, threshold=max_skipped, message=msg)
    ]
    if beta <= 0 or not log:
        verdicts.append(
            Verdict(
                name="grpo_kl",
                ok=True,
                threshold=max_kl,
                message="not measured: beta = 0 skips the reference model (probe_changed "
                "checks that the policy moved)",
            )
        )
    else:
        kl = float(log[-1]["kl"])
        ok = math.isfinite(kl) and kl <= max_kl
        msg = f"mean KL per token to the start adapter in the last step: {kl:.4g}"
        if not ok:
            msg += (
                f", over max_kl={max_kl}: the policy drifted far from where it started. "
                "Lower learning_rate or raise beta"
            )
        verdicts.append(Verdict(name="grpo_kl", ok=ok, value=kl, threshold=max_kl, message=msg))
    return verdicts


def summary(verdicts: Sequence[Verdict]) -> str:
    """One line per verdict, for a console."""
    return "\n".join(f"{'ok  ' if v.ok else 'FAIL'} {v.name}: {v.message}" for v in verdicts)
