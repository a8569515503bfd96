"""Shared-prefix SFT: the tokens that several rows of a batch start with are run once.

An agent's SFT rows of one role start with the same system prompt and tool schemas: on
delegate's orchestrator rows 388 of 552 tokens on average, on its researcher rows 209 of 593.
Those positions' hidden states are the same in every such row (causal attention), so a batch
spent most of its forward and backward on copies of one computation.

The batches stay what the sampler drew (random, mixed roles): the order of training is the
one it would be without this. `groups` splits a batch into the rows that start alike (their
first `KEY_TOKENS` tokens), each cut to its own longest row; `forward` runs a group as one
forward on the common prefix (batch 1, the KV cache kept with its graph) and one on the rest of
each row over that cache, repeated per row. The backward sums the rows' gradients through the
repeat, so loss and gradients equal the plain forward's (tests/test_train.py checks both on
the real model). The prefix stops before the first position whose logit is trained, so every
trained logit comes from the second pass. A group of one row, or with a common prefix under
`MIN_SHARED` tokens, runs plainly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KEY_TOKENS = 64  # rows whose first 64 tokens agree are run as one group
MIN_SHARED = 32  # a shorter common prefix is not worth a second forward


@dataclass
class Group:
    rows: Any  # row indices in the batch (a LongTensor)
    width: int  # the group's longest row: columns after it are padding for all of its rows
    shared: int  # leading tokens run once (0: the group runs plainly)


def shared_length(input_ids, attention_mask, labels) -> int:
    """How many leading positions every row shares and none trains: 0 when sharing does not
    pay (one row, or under MIN_SHARED tokens)."""
    if input_ids.shape[0] < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(0) & attention_mask.bool().all(0)
    common = int(same.long().cumprod(0).sum())
    trained = (labels[:, 1:] != -100).any(0).nonzero()
    # the logit at position p predicts token p + 1: keep every trained logit in the second pass
    first = int(trained[0]) if trained.numel() else labels.shape[1] - 1
    n = min(common, first, input_ids.shape[1] - 1)
    return n if n >= MIN_SHARED else 0


def groups(input_ids, attention_mask, labels) -> list[Group]:
    """The batch's rows by how they start (right padding, as TRL's collator pads)."""
    import torch

    _, which = torch.unique(input_ids[:, :KEY_TOKENS], dim=0, return_inverse=True)
    out = []
    for g in which.unique():
        rows = (which == g).nonzero().squeeze(-1)
        width = int(attention_mask[rows].sum(1).max())
        shared = shared_length(
            input_ids[rows, :width], attention_mask[rows, :width], labels[rows, :width]
        )
        out.append(Group(rows, width, shared))
    return out


def forward(model, input_ids, attention_mask, cols, shared: int):
    """`model`'s output for these rows, logits only at `cols`: plainly, or as the first
    `shared` tokens once and the rest of each row over their KV cache (then cols >= shared)."""
    if not shared:
        return model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
            logits_to_keep=cols,
        )  # fmt: skip
    head = model(input_ids=input_ids[:1, :shared], use_cache=True, logits_to_keep=1)
    cache = head.cache
    cache.batch_repeat_interleave(input_ids.shape[0])
    return model(
        input_ids=input_ids[:, shared:],
        attention_mask=attention_mask,
        cache=cache,
        use_cache=True,
        logits_to_keep=cols - shared,
    )
