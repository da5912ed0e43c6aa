"""Deterministic, rank-sharded, resumable sample order.

Design choices:
- One global order for the whole run: the infinite concatenation of per-epoch
  permutations, epoch `e` shuffled by `np.random.default_rng([seed, e])`. Seeding each epoch
  from `(seed, e)` means any position of the order is computed directly, without replaying
  earlier epochs.
- Each step takes the next `global_batch_size` positions of that order (crossing an epoch
  boundary when it must) and rank `r` of `W` takes the contiguous `r`-th slice. The global
  batch therefore depends only on `(seed, consumed_samples, global_batch_size)`, never on
  the world size: a run can resume on a different number of GPUs and see the same data.
- The whole state is `consumed_samples`, the number the training literature (Megatron,
  GPT-NeoX) already logs; checkpoints store it and nothing else. Changing the global batch
  size mid-run (batch ramp-up) keeps working because positions, not steps, are counted.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class Sampler:
    """Yields this rank's sample indices for each global batch, forever."""

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        consumed_samples: int = 0,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if global_batch_size % world_size:
            raise ValueError(
                f"global_batch_size={global_batch_size} is not divisible by "
                f"world_size={world_size}; every rank must get the same number of samples"
            )
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.consumed_samples = 0
        self.load_state_dict({"consumed_samples": consumed_samples})
        self._cached_epoch = -1
        self._cached_permutation = np.empty(0, dtype=np.int64)

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.world_size

    @property
    def epoch(self) -> int:
        """The epoch the next sample comes from."""
        return self.consumed_samples // self.num_samples

    def _permutation(self, epoch: int) -> np.ndarray:
        # Only one epoch is kept: a batch crosses at most a few, always in increasing order.
        if epoch != self._cached_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._cached_permutation = rng.permutation(self.num_samples).astype(np.int64)
            self._cached_epoch = epoch
        return self._cached_permutation

    def indices_at(self, start: int, count: int) -> np.ndarray:
        """Global-order positions `[start, start + count)` as sample indices."""
        out = np.empty(count, dtype=np.int64)
        filled = 0
        while filled < count:
            epoch, offset = divmod(start + filled, self.num_samples)
            take = min(count - filled, self.num_samples - offset)
            out[filled : filled + take] = self._permutation(epoch)[offset : offset + take]
            filled += take
        return out

    def next_indices(self) -> np.ndarray:
        """This rank's slice of the next global batch; advances `consumed_samples`."""
        start = self.consumed_samples + self.rank * self.local_batch_size
        indices = self.indices_at(start, self.local_batch_size)
        self.consumed_samples += self.global_batch_size
        return indices

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            yield self.next_indices()

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        consumed_samples = int(state["consumed_samples"])
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        self.consumed_samples = consumed_samples
