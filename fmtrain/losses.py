"""Losses: what a batch's logits cost, the seam between the model's output and the optimizer.

A batch is a dict of (batch, seq) tensors: ``input_ids`` and ``labels`` always, ``loss_mask``
(1 where a token counts; instruction tuning masks the prompt) and ``position_ids`` where the data
provides them. A loss function maps ``(logits, batch)`` to the mean over the tokens that count:

    loss = cross_entropy(model(batch["input_ids"]), batch)
    total, tokens = cross_entropy_sum(logits, batch)      # evaluation: sums, shared out over ranks
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, Batch], torch.Tensor]

IGNORE = -100  # the label that counts for nothing (torch's ignore_index, Hugging Face's too)


def _labels(batch: Batch) -> torch.Tensor:
    labels = batch["labels"]
    if (mask := batch.get("loss_mask")) is not None:
        labels = labels.masked_fill(mask == 0, IGNORE)
    return labels.flatten()


def cross_entropy(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over the unmasked tokens, computed in fp32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), _labels(batch), ignore_index=IGNORE)


def cross_entropy_sum(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, int]:
    """The summed cross-entropy over the unmasked tokens, and how many there are."""
    labels = _labels(batch)
    total = F.cross_entropy(logits.flatten(0, 1).float(), labels, ignore_index=IGNORE, reduction="sum")
    return total, int((labels != IGNORE).sum())
