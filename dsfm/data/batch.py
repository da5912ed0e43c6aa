"""Random training windows from one token array: the `get_batch` of a loop you write yourself.

The CS336 way of feeding a model: a flat array of token ids (a prepared split, or any
`np.memmap`/`np.load(..., mmap_mode="r")` of uint16/uint32 ids), and each batch a few
windows at uniformly random offsets. Only the windows are read from disk, so the array may
be far larger than memory. dsfm's own trainer does not use this (it walks a seeded,
resumable, rank-sharded order over packed samples: `dataset.py`, `sampler.py`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dsfm.data.format import open_tokens, read_meta, shards


def load_tokens(data_dir: str | Path, split: str = "train") -> np.memmap:
    """A prepared dataset's split as one memory-mapped array of token ids (no copy)."""
    meta = read_meta(data_dir)
    if split not in meta["splits"]:
        raise ValueError(f"{data_dir} has no split {split!r}; it has {sorted(meta['splits'])}")
    parts = shards(meta, split)
    if len(parts) != 1:
        raise ValueError(
            f"{data_dir} split {split!r} is cut into {len(parts)} shards; load_tokens gives one "
            "array, so prepare it without --shard-size (or use dsfm.data.dataset.TokenDataset)"
        )
    if parts[0]["tokens"] == 0:
        raise ValueError(f"{data_dir} split {split!r} holds no tokens; pick another split")
    return open_tokens(Path(data_dir), meta, parts[0])


def get_batch(
    tokens: np.ndarray,
    batch_size: int,
    context_length: int,
    device: str | torch.device = "cpu",
    rng: np.random.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` windows of `context_length` tokens at random offsets of `tokens`, and
    their next-token targets: two int64 tensors (batch_size, context_length) on `device`.

    Offsets are drawn from `rng`, or from NumPy's global generator (`np.random.seed`) when
    None, uniformly over every start that leaves room for the last target.
    """
    n = len(tokens)
    if tokens.ndim != 1 or n <= context_length:
        raise ValueError(
            f"tokens must be a 1-D array longer than context_length={context_length}, got "
            f"shape {tuple(tokens.shape)}"
        )
    if batch_size < 1 or context_length < 1:
        raise ValueError(
            f"batch_size={batch_size} and context_length={context_length} must be >= 1"
        )
    high = n - context_length  # starts 0 .. n - context_length - 1
    if rng is None:
        starts = np.random.randint(0, high, size=batch_size)
    else:
        starts = rng.integers(0, high, size=batch_size)
    windows = np.asarray(tokens[starts[:, None] + np.arange(context_length + 1)], dtype=np.int64)
    batch = torch.from_numpy(windows)  # (B, T + 1)
    device = torch.device(device)
    if device.type == "cuda":  # pinned host memory lets the copy overlap compute
        batch = batch.pin_memory()
    batch = batch.to(device, non_blocking=True)
    return batch[:, :-1], batch[:, 1:]
