"""Writing a prepared dataset's token files: `.bin` tokens, `.idx` offsets, `.mask` loss masks.

Design choices:
- Tokens stream to disk in buffered batches and are hashed as they are written; only the
  per-document offsets stay in memory.
- With `max_shard_bytes` a split is cut at document boundaries into shards (a single
  document larger than the limit gets a shard of its own); a split that fits in one is
  renamed to the plain `{split}.bin`, so small datasets look as they always did.
- The train/val split is per document, drawn from a seeded generator in corpus order, so it
  is reproducible and no document straddles both splits. The last document is held back
  until the end so that either split found empty can take it: train always gets at least
  one document, and val too when `val_fraction > 0` and there are two or more.
- File names and dtypes come from `format.py`; this module only fills the files.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from pathlib import Path
from typing import BinaryIO

import numpy as np

from dsfm.data.format import MASK_DTYPE, OFFSET_DTYPE, bin_path, idx_path, mask_path, shard_name

# Tokens buffered per split before a write to disk.
WRITE_BUFFER_TOKENS = 1 << 20


class SplitWriter:
    """Appends documents' tokens to `{name}.bin` and records their start offsets."""

    def __init__(self, out_dir: Path, name: str, dtype: np.dtype) -> None:
        self.name = name
        self.bin_path = bin_path(out_dir, name)
        self.idx_path = idx_path(out_dir, name)
        self._file: BinaryIO = open(self.bin_path, "wb")
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self.dtype = dtype
        self.offsets = array("q", [0])
        self.sha256 = hashlib.sha256()

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return self.offsets[-1]

    def add(self, tokens: np.ndarray) -> None:
        self._buffer.append(tokens)
        self._buffered += len(tokens)
        self.offsets.append(self.offsets[-1] + len(tokens))
        if self._buffered >= WRITE_BUFFER_TOKENS:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            data = np.concatenate(self._buffer).tobytes()
            self.sha256.update(data)
            self._file.write(data)
        self._buffer, self._buffered = [], 0

    def close(self) -> None:
        self.flush()
        self._file.close()
        np.asarray(self.offsets, dtype=OFFSET_DTYPE).tofile(self.idx_path)

    def shard_record(self) -> dict:
        return {
            "name": self.name,
            "tokens": int(self.n_tokens),
            "docs": self.n_docs,
            "sha256": self.sha256.hexdigest(),
        }


class ShardedSplitWriter:
    """A split written as shards of at most `max_shard_bytes` each, cut between documents.

    Shards are `{split}-00000.bin`, ...; a split that fits in one is renamed `{split}.bin`
    at the end, so small datasets look as they always did.
    """

    def __init__(
        self, out_dir: Path, split: str, dtype: np.dtype, max_shard_bytes: int | None
    ) -> None:
        self.out_dir, self.split, self.dtype = out_dir, split, dtype
        self.max_tokens = max_shard_bytes // dtype.itemsize if max_shard_bytes else None
        self.shards: list[SplitWriter] = []
        self._new_shard()

    def _new_shard(self) -> None:
        name = shard_name(self.split, len(self.shards))
        self.shards.append(SplitWriter(self.out_dir, name, self.dtype))

    @property
    def n_docs(self) -> int:
        return sum(s.n_docs for s in self.shards)

    @property
    def n_tokens(self) -> int:
        return sum(s.n_tokens for s in self.shards)

    def add(self, tokens: np.ndarray) -> None:
        shard = self.shards[-1]
        if self.max_tokens and shard.n_docs and shard.n_tokens + len(tokens) > self.max_tokens:
            shard.close()
            self._new_shard()
        self.shards[-1].add(tokens)

    def close(self) -> None:
        self.shards[-1].close()
        if len(self.shards) == 1:
            only = self.shards[0]
            for path in (bin_path, idx_path):
                os.rename(path(self.out_dir, only.name), path(self.out_dir, self.split))
            only.name = self.split

    def split_record(self) -> dict:
        return {
            "tokens": int(self.n_tokens),
            "docs": self.n_docs,
            "shards": [s.shard_record() for s in self.shards],
        }


class SplitAssigner:
    """Seeded per-document train/val choice, with the last document held back.

    Holding one document back until the next arrives lets `finish` give it to whichever
    split would otherwise be empty.
    """

    def __init__(self, writers: dict[str, SplitWriter], val_fraction: float, seed: int) -> None:
        self.writers = writers
        self.val_fraction = val_fraction
        self._rng = np.random.default_rng(seed)
        self._pending: tuple[np.ndarray, str] | None = None

    def add(self, tokens: np.ndarray) -> None:
        split = "val" if self._rng.random() < self.val_fraction else "train"
        if self._pending is not None:
            pending_tokens, pending_split = self._pending
            self.writers[pending_split].add(pending_tokens)
        self._pending = (tokens, split)

    def finish(self) -> None:
        if self._pending is None:
            return
        tokens, split = self._pending
        if self.writers["train"].n_docs == 0:
            split = "train"
        elif self.writers["val"].n_docs == 0 and self.val_fraction > 0:
            split = "val"
        self.writers[split].add(tokens)
        self._pending = None


class MaskedSplitWriter(SplitWriter):
    """A `SplitWriter` plus `{split}.mask`; `add` takes a (2, n) tokens-and-mask array."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype) -> None:
        super().__init__(out_dir, split, dtype)
        self.mask_path = mask_path(out_dir, split)
        self._mask_file = open(self.mask_path, "wb")
        self._mask_buffer: list[np.ndarray] = []
        self.n_loss_tokens = 0

    def add(self, conversation: np.ndarray) -> None:
        tokens, mask = conversation
        # Buffered before super().add, which may flush both buffers.
        self._mask_buffer.append(mask.astype(MASK_DTYPE))
        self.n_loss_tokens += int(mask.sum())
        super().add(tokens)

    def flush(self) -> None:
        super().flush()
        if self._mask_buffer:
            self._mask_file.write(np.concatenate(self._mask_buffer).tobytes())
        self._mask_buffer = []

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._mask_file.close()
