"""Weighted blends of prepared datasets (`data.mix`), in O(#sources) memory.

Design choices:
- Position `p` of a blend is decided by arithmetic, never by a per-sample table: a fixed
  pattern of `PERIOD` slots gives each source `quota_k ~= weight_k * PERIOD` of them, so
  slot `p % PERIOD` names the source and the source-local position is
  `(p // PERIOD) * quota_k + (earlier slots of k in the pattern)`. The pattern and that
  count are two int32 tables of `PERIOD` entries, built once (512 KB whatever the data).
- The pattern places the `j`-th slot of source `k` at its ideal time `(j + 0.5) / quota_k`
  and sorts all slots by it (ties by source index): every prefix of the pattern then holds
  each source within about one slot of its exact share, so any window of the endless
  order has the weights' proportions up to a couple of samples per source (Megatron's
  "pick the source that lags its weight most" gives the same bound, one slot at a time).
  Weights are realised in steps of 1/PERIOD; a tiny positive weight still gets one slot.
- Each source then reads its local positions through its own endless epoch-by-epoch
  permutation (`sampler.shuffled`, keyed by (seed, source index)), so a small source
  repeats, reshuffled, while a large one is still in its first epoch. Consumed samples
  per source, hence fractional epochs, follow from `consumed_samples` alone.
- `BlendedDataset` has TokenDataset's interface, indexed by blend position: the trainer's
  sampler hands it positions unshuffled (`Sampler(shuffle=False)`) and the blend decides
  the rest. Validation uses `seed=None`: each source's first samples in order, blended
  by the same weights, the same set at every eval.
- A blend of one source with weight 1 is exactly `data.path`'s order (stream 0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from dsfm.data.dataset import TokenDataset
from dsfm.data.sampler import shuffled

PERIOD = 1 << 16


def quotas(weights: Sequence[float], period: int = PERIOD) -> np.ndarray:
    """Slots per source in one period: proportional to `weights`, summing to `period`,
    at least one each (largest-remainder rounding)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"blend weights must be a non-empty list of numbers > 0, got {weights}")
    if len(w) > period:
        raise ValueError(f"a blend holds at most {period} sources, got {len(w)}")
    exact = w / w.sum() * period
    q = np.maximum(np.floor(exact).astype(np.int64), 1)
    # Hand out (or take back) the rounding difference by largest (smallest) remainder.
    order = np.argsort(-(exact - np.floor(exact)), kind="stable")
    i = 0
    while q.sum() != period:
        k = order[i % len(q)]
        if q.sum() < period:
            q[k] += 1
        elif q[k] > 1:
            q[k] -= 1
        i += 1
    return q


class Blend:
    """Which source, and which of its samples, sits at each position of a weighted blend."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], seed: int | None):
        if len(sizes) != len(weights) or any(int(n) < 1 for n in sizes):
            raise ValueError(f"need one size >= 1 per weight, got sizes {list(sizes)}")
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.seed = seed
        self.quotas = quotas(weights)
        slots = np.concatenate([np.arange(q) for q in self.quotas])  # j-th slot of its source
        source = np.repeat(np.arange(len(self.quotas)), self.quotas)
        ideal = (slots + 0.5) / np.repeat(self.quotas, self.quotas)
        order = np.lexsort((source, ideal))  # by ideal time, ties by source
        self.pattern = source[order].astype(np.int32)  # (PERIOD,) source of each slot
        self.slot = slots[order].astype(np.int32)  # (PERIOD,) earlier slots of the same source

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source index, sample index within that source) of each blend position."""
        positions = np.asarray(positions, dtype=np.int64)
        period, r = np.divmod(positions, PERIOD)
        source = self.pattern[r].astype(np.int64)
        local = period * self.quotas[source] + self.slot[r]  # source-local position
        sample = np.empty_like(local)
        for k in np.unique(source):
            m = source == k
            n, k = int(self.sizes[k]), int(k)
            sample[m] = local[m] % n if self.seed is None else shuffled(local[m], n, self.seed, k)
        return source, sample

    def consumed(self, consumed_samples: int) -> np.ndarray:
        """Samples taken from each source by the first `consumed_samples` positions."""
        period, r = divmod(int(consumed_samples), PERIOD)
        head = np.bincount(self.pattern[:r], minlength=len(self.quotas))
        return period * self.quotas + head

    def epochs(self, consumed_samples: int) -> np.ndarray:
        """Epochs of each source consumed so far (fractional)."""
        return self.consumed(consumed_samples) / self.sizes


class BlendedDataset:
    """TokenDataset's interface over a blend: sample `i` is blend position `i`.

    `len()` is the sources' total, one nominal pass; positions beyond it are valid and keep
    cycling every source by its weight.
    """

    def __init__(
        self,
        datasets: Sequence[TokenDataset],
        weights: Sequence[float],
        names: Sequence[str],
        seed: int | None,
    ) -> None:
        if not len(datasets) == len(weights) == len(names):
            raise ValueError("need one weight and one name per dataset")
        self.datasets = list(datasets)
        self.names = list(names)
        self.weights = [float(w) for w in weights]
        self.blend = Blend([len(d) for d in datasets], weights, seed)
        first = self.datasets[0]
        self.meta = first.meta
        self.vocab_size: int = first.vocab_size
        self.eot_id: int = first.eot_id
        self.seq_len: int = first.seq_len
        self.n_tokens: int = sum(d.n_tokens for d in self.datasets)

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def by_source(self, indices: Sequence[int]) -> list[np.ndarray]:
        """Each source's sample indices among blend positions `indices`, in position order."""
        source, sample = self.blend.locate(np.asarray(indices, dtype=np.int64))
        return [sample[source == k] for k in range(len(self.datasets))]

    def __getitem__(self, i: int) -> np.ndarray:
        """Tokens of blend position `i`, int64, shape (seq_len + 1,)."""
        source, sample = self.blend.locate(np.array([int(i)]))
        return self.datasets[int(source[0])][int(sample[0])]

    def _gather(
        self, indices: Sequence[int], read: Callable[[TokenDataset, np.ndarray], tuple]
    ) -> list[torch.Tensor]:
        source, sample = self.blend.locate(np.asarray(indices, dtype=np.int64))
        out: list[torch.Tensor] = []
        for k in np.unique(source):
            m = source == k
            parts = read(self.datasets[k], sample[m])
            if not out:
                out = [p.new_empty((len(source), *p.shape[1:])) for p in parts]
            for o, p in zip(out, parts):
                o[torch.from_numpy(m)] = p
        return out

    def batch(self, indices: Sequence[int]) -> torch.LongTensor:
        """Samples at blend positions `indices` stacked, shape (B, seq_len + 1)."""
        return self._gather(indices, lambda d, s: (d.batch(s),))[0]

    def inputs_and_labels(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (B, seq_len) and labels (B, seq_len) at blend positions `indices`."""
        x, y = self._gather(indices, lambda d, s: d.inputs_and_labels(s))
        return x, y

    def epochs(self, consumed_samples: int) -> dict[str, float]:
        """Fractional epochs of each source after `consumed_samples` positions, by name."""
        return {n: float(e) for n, e in zip(self.names, self.blend.epochs(consumed_samples))}

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{n}: {w:g} x {len(d)}" for n, w, d in zip(self.names, self.weights, self.datasets)
        )
        return f"BlendedDataset({parts})"


def open_split(
    sources: Sequence[tuple[str, str, float]],
    split: str,
    seq_len: int,
    seed: int | None,
    warn: Callable[[str], None] | None = None,
) -> BlendedDataset:
    """The blend of `split` of each `(name, path, weight)` source.

    With `warn`, a source whose split is missing or too short is left out (its weight with
    it) after `warn(reason)`; without, that is a ValueError. No source left: ValueError.
    """
    datasets, weights, names = [], [], []
    for name, path, weight in sources:
        try:
            datasets.append(TokenDataset(Path(path), split, seq_len))
        except ValueError as e:
            if warn is None:
                raise ValueError(f"data.mix source {name!r}: {e}") from e
            warn(f"source {name!r} left out of the {split!r} blend: {e}")
            continue
        weights.append(weight)
        names.append(name)
    if not datasets:
        raise ValueError(f"no source of the blend has a usable {split!r} split")
    return BlendedDataset(datasets, weights, names, seed)
