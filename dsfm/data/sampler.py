"""Deterministic, rank-sharded, resumable sample order.

Design choices:
- One global order for the whole run: the infinite concatenation of per-epoch
  permutations of `range(num_samples)`. Epoch `e` is a keyed bijection (`permute`) computed
  per index, so any position of the order costs O(1) time and memory: a 10^9-sample dataset
  starts instantly and a batch costs O(batch), never O(samples).
- The bijection is a Feistel network on the smallest power-of-two domain that holds
  `[0, n)` (unbalanced halves when the bit count is odd), with cycle walking: a result
  `>= n` is permuted again until it lands inside, which keeps it a bijection of `[0, n)`.
  The domain is below `2n`, so a walk takes under two rounds on average. Six rounds of a
  splitmix64 round function keyed by `(seed, stream, epoch)` mix far beyond what data
  order needs (Luby-Rackoff: four rounds of a good round function already give a
  pseudorandom permutation). `stream` separates the sources of a blend (see `blend.py`).
- Each step takes the next `global_batch_size` positions of that order (crossing an epoch
  boundary when it must) and rank `r` of `W` takes the contiguous `r`-th slice. The global
  batch therefore depends only on `(seed, consumed_samples, global_batch_size)`, never on
  the world size: a run can resume on a different number of GPUs and see the same data.
- The whole state is `consumed_samples`, the number the training literature (Megatron,
  GPT-NeoX) already logs; checkpoints store it and nothing else. Changing the global batch
  size mid-run (batch ramp-up) keeps working because positions, not steps, are counted.
- A dataset that orders its own samples (a blend) takes the positions unshuffled
  (`shuffle=False`): the sampler then only counts and shards.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

FEISTEL_ROUNDS = 6
_GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / phi: spreads small integers over 64 bits
_U64 = (1 << 64) - 1


def _odd_constant(i: int) -> np.uint64:
    # Python ints, masked: numpy warns on uint64 scalar overflow, arrays wrap silently.
    return np.uint64((int(i) * _GOLDEN + 1) & _U64)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a fast uint64 -> uint64 hash with full avalanche."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _round_keys(seed: int, stream: int, epochs: np.ndarray) -> list[np.ndarray]:
    """One uint64 key per round and element, from (seed, stream, epoch)."""
    key = _mix(np.full(epochs.shape, seed & _U64, dtype=np.uint64) ^ _odd_constant(1))
    key = _mix(key ^ _odd_constant(stream + 2))
    key = _mix(key ^ epochs.astype(np.uint64))
    return [_mix(key ^ _odd_constant(FEISTEL_ROUNDS + r)) for r in range(FEISTEL_ROUNDS)]


def permute(
    offsets: np.ndarray, n: int, seed: int, epochs: np.ndarray | int = 0, stream: int = 0
) -> np.ndarray:
    """`offsets` (each in `[0, n)`) through epoch `epochs`' seeded bijection of `[0, n)`.

    Vectorised; `epochs` is one epoch for all offsets or one per offset. For a fixed key
    `(seed, stream, epoch)` the map is a permutation of `range(n)`.
    """
    x = np.asarray(offsets, dtype=np.uint64)
    if n == 1:
        return np.zeros(x.shape, dtype=np.int64)
    bits = max(2, int(n - 1).bit_length())  # domain 2**bits >= n, below 2n (4 for n=2)
    keys = _round_keys(seed, stream, np.broadcast_to(np.asarray(epochs), x.shape))
    out = x.copy()
    todo = np.arange(x.size)
    while todo.size:  # cycle walking: re-permute what fell outside [0, n)
        y = _feistel(out[todo], bits, [k[todo] for k in keys])
        out[todo] = y
        todo = todo[y >= np.uint64(n)]
    return out.astype(np.int64)


def _feistel(x: np.ndarray, bits: int, keys: list[np.ndarray]) -> np.ndarray:
    """A bijection of `[0, 2**bits)`: each round (L, R) -> (R, L ^ F(R)), halves alternating."""
    left_bits, right_bits = (bits + 1) // 2, bits // 2
    for key in keys:
        left, right = x >> np.uint64(right_bits), x & np.uint64((1 << right_bits) - 1)
        f = _mix(right ^ key) & np.uint64((1 << left_bits) - 1)
        x = (right << np.uint64(left_bits)) | (left ^ f)
        left_bits, right_bits = right_bits, left_bits
    return x


def shuffled(positions: np.ndarray, n: int, seed: int, stream: int = 0) -> np.ndarray:
    """Sample index at each position of the endless epoch-by-epoch shuffled order of `n`."""
    positions = np.asarray(positions, dtype=np.int64)
    epochs, offsets = np.divmod(positions, n)
    return permute(offsets, n, seed, epochs, stream)


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
        shuffle: bool = True,
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
        self.shuffle = shuffle
        self.consumed_samples = 0
        self.load_state_dict({"consumed_samples": consumed_samples})

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.world_size

    @property
    def epoch(self) -> int:
        """The epoch the next sample comes from."""
        return self.consumed_samples // self.num_samples

    def indices_at(self, start: int, count: int) -> np.ndarray:
        """Global-order positions `[start, start + count)` as sample indices."""
        positions = np.arange(start, start + count, dtype=np.int64)
        if not self.shuffle:
            return positions
        return shuffled(positions, self.num_samples, self.seed)

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
