"""Writing a prepared dataset's token files: `.bin` tokens, `.idx` offsets, `.mask` loss masks.

Design choices:
- Tokens stream to disk in buffered batches and are hashed as they are written; only the
  per-document offsets stay in memory. A document may arrive in parts (`end=False` until
  its last), so one longer than memory streams through too.
- With `max_shard_bytes` a split is cut at document boundaries into shards (a single
  document larger than the limit gets a shard of its own); a split that fits in one is
  renamed to the plain `{split}.bin`, so small datasets look as they always did.
- The train/val split of text (`TextSplitAssigner`) is per document, drawn from a seeded
  generator in corpus order, so it is reproducible; the first document always goes to
  train, and a document whose tokens would take val past twice its share goes to train.
  When whole documents leave val under half its share (few, large documents: one text
  file is one document), the end of train is moved into val until val holds
  `val_fraction` of the tokens: the end of the corpus, as nanoGPT's 90/10 split, cut
  after a line end. So a single file gets the val split it asked for.
- Chat data (`SplitAssigner`) is split by whole conversations only (the last one held back
  so either split found empty can take it): a conversation cut in two trains on nothing.
- File names and dtypes come from `format.py`; this module only fills the files.
"""

from __future__ import annotations

import hashlib
import math
import os
from array import array
from pathlib import Path
from typing import BinaryIO

import numpy as np

from dsfm.data.format import (
    MASK_DTYPE,
    OFFSET_DTYPE,
    bin_path,
    file_sha256,
    idx_path,
    mask_path,
    shard_name,
)

# Tokens buffered per split before a write to disk (and moved at a time by a val cut).
WRITE_BUFFER_TOKENS = 1 << 20
# How far back from the exact cut the val cut looks for a line end.
CUT_SEARCH_TOKENS = 4096


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
        self.n_tokens = 0  # offsets[-1] plus the parts of a document still open
        self.sha256: hashlib._Hash | None = hashlib.sha256()  # None: rehash at the end

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def open_doc(self) -> bool:
        return self.n_tokens != self.offsets[-1]

    def add(self, tokens: np.ndarray, end: bool = True) -> None:
        """Append tokens; `end=False` when more of the same document follows."""
        # A copy: a view would pin its whole batch until the flush (val flushes rarely).
        self._buffer.append(np.array(tokens, dtype=self.dtype))
        self._buffered += len(tokens)
        self.n_tokens += len(tokens)
        if end:
            self.offsets.append(self.n_tokens)
        if self._buffered >= WRITE_BUFFER_TOKENS:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            data = np.concatenate(self._buffer).tobytes()
            if self.sha256 is not None:
                self.sha256.update(data)
            self._file.write(data)
        self._buffer, self._buffered = [], 0

    def cut_tail(self, n: int, clean: np.ndarray, eot_id: int, into: SplitWriter) -> int:
        """Move about the last `n` tokens into `into`, cut after a token `clean` marks (a
        line end, or EOT) within `CUT_SEARCH_TOKENS` before the exact cut if one is there.
        The document cut in two ends with EOT on both sides. Returns the tokens moved."""
        self.flush()
        self._file.flush()
        tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))
        cut = _clean_cut(tokens, self.n_tokens - n, clean, eot_id)
        offsets = np.asarray(self.offsets, dtype=OFFSET_DTYPE)
        first = int(np.searchsorted(offsets, cut, side="right")) - 1  # the document cut
        for doc in range(first, self.n_docs):
            start, stop = max(cut, int(offsets[doc])), int(offsets[doc + 1])
            for part in range(start, stop, WRITE_BUFFER_TOKENS):
                end = min(part + WRITE_BUFFER_TOKENS, stop)
                into.add(np.array(tokens[part:end]), end=end == stop)
        del tokens
        self._file.truncate(cut * self.dtype.itemsize)
        self._file.seek(0, os.SEEK_END)
        self.offsets = array("q", offsets[: first + 1].tolist())
        self.n_tokens, self.sha256 = cut, None
        if cut > offsets[first]:  # the train side of the cut document ends too
            self.add(np.array([eot_id], dtype=self.dtype))
        return int(offsets[-1]) - cut

    def close(self) -> None:
        assert not self.open_doc, f"{self.bin_path}: closed inside a document"
        self.flush()
        self._file.close()
        np.asarray(self.offsets, dtype=OFFSET_DTYPE).tofile(self.idx_path)
        self.digest = self.sha256.hexdigest() if self.sha256 else file_sha256(self.bin_path)

    def shard_record(self) -> dict:
        return {
            "name": self.name,
            "tokens": int(self.n_tokens),
            "docs": self.n_docs,
            "sha256": self.digest,
        }


def _clean_cut(tokens: np.ndarray, cut: int, clean: np.ndarray, eot_id: int) -> int:
    """The start of val: just after the last clean token at or before `cut` within the
    search window, and never on an EOT (val would start with an empty document); `cut`
    itself when there is none. Train keeps at least one token."""
    cut = max(1, cut)
    low = max(1, cut - CUT_SEARCH_TOKENS)
    window = np.asarray(tokens[low - 1 : cut + 1])  # tokens low-1 .. cut
    ok = clean[window[:-1]] & (window[1:] != eot_id)  # cut at c: clean before, no EOT at c
    hits = np.flatnonzero(ok)
    return low + int(hits[-1]) if len(hits) else cut


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

    def add(self, tokens: np.ndarray, end: bool = True) -> None:
        shard = self.shards[-1]
        if (
            self.max_tokens
            and shard.n_docs
            and not shard.open_doc
            and shard.n_tokens + len(tokens) > self.max_tokens
        ):
            shard.close()
            self._new_shard()
        self.shards[-1].add(tokens, end)

    def cut_tail(self, n: int, clean: np.ndarray, eot_id: int, into: ShardedSplitWriter) -> int:
        """`SplitWriter.cut_tail` on the last shard (which keeps at least one token)."""
        last = self.shards[-1]
        n = min(n, last.n_tokens - 1)
        return last.cut_tail(n, clean, eot_id, into) if n > 0 else 0

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


class TextSplitAssigner:
    """Seeded per-document train/val choice, then val topped up from the end of train.

    `clean[id]` marks the ids val may start after (line ends, EOT), for the cut.
    """

    def __init__(
        self,
        writers: dict[str, ShardedSplitWriter],
        val_fraction: float,
        seed: int,
        clean: np.ndarray,
        eot_id: int,
    ) -> None:
        self.writers = writers
        self.val_fraction = val_fraction
        self.clean, self.eot_id = clean, eot_id
        self._rng = np.random.default_rng(seed)
        self._split: str | None = None  # of the document being added in parts
        self.cut_tokens = 0  # moved from the end of train into val by `finish`

    def add(self, tokens: np.ndarray, end: bool = True) -> None:
        """A document, or a part of one (`end=False` until its last part)."""
        if self._split is None:
            self._split = self._draw(tokens if end else None)
        self.writers[self._split].add(tokens, end)
        if end:
            self._split = None

    def _draw(self, whole: np.ndarray | None) -> str:
        """val with probability val_fraction, if the document is whole (one in parts is
        large: the cut serves it), train is not empty, and val stays under twice its share."""
        drawn = self._rng.random() < self.val_fraction
        train, val = self.writers["train"], self.writers["val"]
        if not drawn or whole is None or train.n_docs == 0:
            return "train"
        total = train.n_tokens + val.n_tokens + len(whole)
        fits = val.n_tokens + len(whole) <= 2 * self.val_fraction * total
        return "val" if fits else "train"

    def finish(self) -> None:
        """Top val up to val_fraction from the end of train when whole documents left it
        under half of that."""
        train, val = self.writers["train"], self.writers["val"]
        target = math.ceil(self.val_fraction * (train.n_tokens + val.n_tokens))
        if 2 * val.n_tokens < target:
            need = max(2, target - val.n_tokens)  # one token and its EOT, at the least
            self.cut_tokens = train.cut_tail(need, self.clean, self.eot_id, val)


class SplitAssigner:
    """Seeded per-conversation train/val choice, with the last one held back.

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
