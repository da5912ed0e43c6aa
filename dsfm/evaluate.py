"""Validation loss over a fixed set of samples, averaged over every rank.

The set is the first `n` samples of the split (the same every time, so evals are
comparable across steps and runs), split contiguously across ranks so each rank runs the
same number of forward passes (ZeRO-3 forwards are collective).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as torch_dist

from dsfm.data.dataset import TokenDataset


def eval_indices(dataset: TokenDataset, n_samples: int, rank: int, world_size: int) -> list[int]:
    n = min(len(dataset), n_samples) // world_size * world_size
    per_rank = n // world_size
    return list(range(rank * per_rank, (rank + 1) * per_rank))


@torch.no_grad()
def mean_loss(
    forward: Callable[..., torch.Tensor],
    dataset: TokenDataset,
    indices: list[int],
    micro_batch_size: int,
    device: torch.device,
) -> float:
    """Token-mean cross-entropy over `indices` on this rank, all-reduced across ranks."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for start in range(0, len(indices), micro_batch_size):
        batch = dataset.batch(indices[start : start + micro_batch_size]).to(device)
        loss = forward(batch[:, :-1], labels=batch[:, 1:])
        n = batch[:, 1:].numel()
        total += torch.tensor([loss.double().item() * n, n], dtype=torch.float64, device=device)
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.all_reduce(total)
    return (total[0] / total[1]).item() if total[1] > 0 else float("nan")


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def summary(loss: float) -> dict[str, Any]:
    return {"val_loss": loss, "val_ppl": perplexity(loss)}
