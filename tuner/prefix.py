"""Shared-prefix SFT batches: the tokens every row of a batch starts with are run once.

An agent's SFT rows of one role start with the same system prompt and tool schemas: on
delegate's orchestrator rows 388 of 552 tokens on average, on its researcher rows 209 of 593.
Those positions' hidden states are the same in every row (causal attention), so a batch of 8
spent most of its forward and backward on 8 copies of one computation.

`group_order` hands the trainer batches whose rows share their start: rows are grouped by
their first `KEY_TOKENS` tokens, each group shuffled (per epoch) and cut into full batches,
the batches shuffled; what is left of each group makes the last, mixed batches. Within a
group, rows of similar length go together (mega-batches sorted by length, as
transformers' LengthGroupedSampler does), which also cuts padding.

`shared_prefix_forward` runs a batch as one forward on the common prefix (batch 1, KV cache
kept with its graph) and one on the rest of each row over that cache, repeated per row. The
backward sums the rows' gradients through the repeat, so loss and gradients equal the plain
forward's (tests/test_train.py checks both on the real model). The prefix stops before the
first position whose logit is trained, so every trained logit comes from the second pass.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

KEY_TOKENS = 64  # rows whose first 64 tokens agree are batched together
MIN_SHARED = 32  # a shorter common prefix is not worth a second forward
MEGA_BATCHES = 4  # rows of a group sorted by length within this many batches


def group_order(keys: Sequence[Any], lengths: Sequence[int], batch: int, seed: int) -> list[int]:
    """Row indices in an order whose consecutive runs of `batch` share a key where they can.
    Deterministic for a `seed` (the trainer passes its seed plus the epoch)."""
    rng = random.Random(seed)
    groups: dict[Any, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        groups[key].append(i)
    full: list[list[int]] = []
    rest: list[int] = []
    for key in sorted(groups, key=lambda k: groups[k][0]):  # insertion order, seeded shuffles
        rows = groups[key]
        rng.shuffle(rows)
        mega = batch * MEGA_BATCHES
        rows = [
            i
            for start in range(0, len(rows), mega)
            for i in sorted(rows[start : start + mega], key=lambda j: -lengths[j])
        ]
        cut = len(rows) - len(rows) % batch
        full += [rows[s : s + batch] for s in range(0, cut, batch)]
        rest += rows[cut:]
    rng.shuffle(full)
    rest.sort(key=lambda j: -lengths[j])
    return [i for b in full for i in b] + rest


class GroupedSampler:
    """A torch sampler over `group_order`, reshuffled each epoch (accelerate calls
    `set_epoch`), so a resumed run replays the same order."""

    def __init__(self, keys: Sequence[Any], lengths: Sequence[int], batch: int, seed: int):
        self.keys, self.lengths, self.batch, self.seed = list(keys), list(lengths), batch, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[int]:
        return iter(group_order(self.keys, self.lengths, self.batch, self.seed + self.epoch))


def shared_length(input_ids, attention_mask, labels) -> int:
    """How many leading positions every row of the batch shares and none trains: 0 when
    sharing does not pay (one row, or under MIN_SHARED tokens)."""
    if input_ids.shape[0] < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(0) & attention_mask.bool().all(0)
    common = int(same.long().cumprod(0).sum())
    trained = (labels[:, 1:] != -100).any(0).nonzero()
    # the logit at position p predicts token p + 1: keep every trained logit in the second pass
    first = int(trained[0]) if trained.numel() else labels.shape[1] - 1
    n = min(common, first, input_ids.shape[1] - 1)
    return n if n >= MIN_SHARED else 0


def shared_prefix_forward(model, inputs: dict, cols, n: int):
    """`model`'s output for the batch, computed as prefix (first `n` tokens, once) plus the
    rest of each row; logits only at `cols` (positions in the full rows, all >= n)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    head = model(input_ids=ids[:1, :n], use_cache=True, logits_to_keep=1)
    cache = head.cache
    cache.batch_repeat_interleave(ids.shape[0])
    return model(
        input_ids=ids[:, n:],
        attention_mask=mask,
        cache=cache,
        use_cache=True,
        logits_to_keep=cols - n,
    )
