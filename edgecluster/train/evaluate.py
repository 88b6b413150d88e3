"""Held-out evaluation of a `FullModel`, with all layers or a subset of them.

`eval_loss` is the mean token cross-entropy over fixed batches (perplexity is its
exp); `layer_subset` says which layers remain when a fraction is dropped, for
SkipPipe's robustness check (a model trained with skipped stages should degrade
gracefully when run with missing layers).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

import torch

from edgecluster.train.data import split_batch
from edgecluster.train.model import FullModel


@torch.no_grad()
def eval_loss(
    model: FullModel, batches: Iterable[torch.Tensor], keep_layers: Sequence[int] | None = None
) -> float:
    """Mean token cross-entropy of `model` over [B, T + 1] `batches` (no gradients)."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            ids, targets = split_batch(batch)
            total += float(model.loss_sum(ids, targets, keep_layers))
            count += targets.numel()
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("eval_loss needs at least one non-empty batch")
    return total / count


def layer_subset(num_layers: int, fraction: float, seed: int | None = None) -> list[int]:
    """Layers that remain, ascending, when `fraction` of `num_layers` is dropped.

    The first and last layers are always kept. seed None: the kept layers are evenly
    spaced; an int: the interior layers kept are a random choice drawn from that seed.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the fraction of layers to drop must be in [0, 1), got {fraction}")
    keep = max(min(num_layers, 2), num_layers - round(fraction * num_layers))
    if keep == num_layers:
        return list(range(num_layers))
    if seed is not None:
        interior = random.Random(seed).sample(range(1, num_layers - 1), keep - 2)
        return [0, *sorted(interior), num_layers - 1]
    step = (num_layers - 1) / (keep - 1)
    return sorted({round(i * step) for i in range(keep)})
