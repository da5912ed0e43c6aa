"""Packed next-token samples read straight from a prepared token stream.

Design choices:
- The split's `.bin` is memory-mapped read-only: the OS page cache is the only copy, every
  rank and worker shares it, and opening a dataset costs nothing however large it is.
- Samples are packed windows over the flat stream, ignoring document boundaries (EOT marks
  them): sample `i` is tokens `[i*seq_len, i*seq_len + seq_len + 1)`, so inputs are
  `[:-1]` and targets `[1:]`, and consecutive samples share one boundary token. Every token
  is trained on and no padding is needed.
- A sharded split is the concatenation of its shards' samples: windows never cross a
  shard boundary (each shard loses under one window at its end), so a sample is one slice
  of one memmap and shards can be opened independently.
- Sample order is not this module's business: `sampler.py` chooses indices.
- Opening checks the files against `meta.json` first (`format.read_meta`), so a truncated
  copy fails at start-up with the file's name instead of mid-run.
- Pickling drops the memmap and reopens it, so a DataLoader worker gets a view of the
  file rather than a copy of the whole split.
- For document-masked training (`model.doc_mask`) `doc_positions` gives each input token
  its position within its document, from the window's tokens alone: a document starts
  after each EOT. The model derives RoPE angles and the same-document mask from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dsfm.data.format import bin_path, open_mask, open_tokens, read_meta, shards


class TokenDataset:
    """Fixed-length next-token windows over one split, indexed `0 .. len-1`."""

    def __init__(self, data_dir: str | Path, split: str, seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.data_dir = Path(data_dir)
        self.meta = read_meta(self.data_dir)
        if split not in self.meta["splits"]:
            raise ValueError(
                f"{self.data_dir} has no {split!r} split (has {sorted(self.meta['splits'])})"
            )
        self.split = split
        self.seq_len = seq_len
        self.vocab_size: int = self.meta["vocab_size"]
        self.eot_id: int = self.meta["eot_id"]
        self.n_tokens: int = self.meta["splits"][split]["tokens"]
        self.shards = shards(self.meta, split)
        sizes = [max(0, (shard["tokens"] - 1) // seq_len) for shard in self.shards]
        if sum(sizes) == 0:
            raise ValueError(
                f"the {split!r} split of {self.data_dir} has {self.n_tokens} tokens, but one "
                f"sample of seq_len={seq_len} needs {seq_len + 1} in one shard; use a shorter "
                f"seq_len, or more data / a larger val_fraction in `dsfm prepare`"
            )
        # bounds[k] is the first sample of shard k; samples of shard k are local windows
        self._bounds = np.cumsum([0, *sizes])
        self._tokens, self._mask = self._open()

    def _open(self) -> tuple[list[np.memmap], list[np.memmap] | None]:
        tokens = [open_tokens(self.data_dir, self.meta, shard) for shard in self.shards]
        if not self.meta.get("loss_mask"):
            return tokens, None
        # instruction data: learn only the marked tokens
        return tokens, [open_mask(self.data_dir, shard) for shard in self.shards]

    def __len__(self) -> int:
        return int(self._bounds[-1])

    def _locate(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(shard, first token in that shard) of each sample index; negatives count from
        the end, like a list."""
        i = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        bad = (i < -n) | (i >= n)
        if bad.any():
            raise IndexError(f"sample {int(i[bad][0])} out of range for {n} samples")
        i = i % n
        shard = np.searchsorted(self._bounds, i, side="right") - 1
        return shard, (i - self._bounds[shard]) * self.seq_len

    def _gather(self, arrays: list[np.memmap], indices: Sequence[int]) -> np.ndarray:
        """Windows of seq_len + 1 values for each sample, shape (B, seq_len + 1)."""
        shard, start = self._locate(indices)
        window = np.arange(self.seq_len + 1)
        out = np.empty((len(start), self.seq_len + 1), dtype=np.int64)
        for k in np.unique(shard):
            rows = np.flatnonzero(shard == k)
            out[rows] = arrays[k][start[rows, None] + window]
        return out

    def __getitem__(self, i: int) -> np.ndarray:
        """Tokens of sample `i`, int64, shape (seq_len + 1,)."""
        return self._gather(self._tokens, [int(i)])[0]

    def batch(self, indices: Sequence[int]) -> torch.LongTensor:
        """Samples `indices` stacked, shape (B, seq_len + 1); ids checked against the
        vocabulary here, on the host, so the model never has to read them back from a GPU."""
        tokens = self._gather(self._tokens, indices)
        if tokens.size and (tokens.max() >= self.vocab_size or tokens.min() < 0):
            bad = int(np.argmax((tokens >= self.vocab_size).any(1) | (tokens < 0).any(1)))
            shard, start = (int(v[0]) for v in self._locate([indices[bad]]))
            raise ValueError(
                f"{bin_path(self.data_dir, self.shards[shard]['name'])}: a token id of sample "
                f"{int(indices[bad])} (tokens {start}..{start + self.seq_len}) is not below the "
                f"vocabulary size {self.vocab_size}; the file is damaged or was made with "
                "another tokenizer: `dsfm data verify` locates every such id"
            )
        return torch.from_numpy(tokens)

    def inputs_and_labels(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (B, seq_len) and next-token labels (B, seq_len); tokens outside the
        dataset's loss mask (prompts, in instruction data) get label -100."""
        tokens = self.batch(indices)
        if self._mask is None:
            return tokens[:, :-1], tokens[:, 1:]
        return masked_labels(tokens, torch.from_numpy(self._gather(self._mask, indices)))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_tokens"], state["_mask"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._tokens, self._mask = self._open()

    def __repr__(self) -> str:
        return (
            f"TokenDataset({str(self.data_dir)!r}, split={self.split!r}, seq_len={self.seq_len}, "
            f"samples={len(self)}, tokens={self.n_tokens}, shards={len(self.shards)})"
        )


def masked_labels(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) from windows of T+1 tokens and their mask, shape (..., T) each.

    `labels[t] = tokens[t+1]` where `mask[t+1]` is 1, else -100, so the loss only sees the
    tokens the model must learn to produce.
    """
    targets = tokens[..., 1:]
    labels = torch.where(mask[..., 1:].bool(), targets, torch.full_like(targets, -100))
    return tokens[..., :-1], labels


def doc_positions(input_ids: torch.Tensor, eot_id: int) -> torch.Tensor:
    """Each input token's position within its document, int64, shaped like `input_ids` (..., T).

    A document starts at the window's first token and after every EOT (the EOT belongs to
    the document it ends), so positions count 0, 1, 2, ... and restart at 0 there. The
    window's first token usually continues a document begun before the window; it gets
    position 0 all the same, since nothing before it is in the window to attend to.
    """
    ids = input_ids.numpy()  # a CPU batch, as inputs_and_labels returns it
    T = ids.shape[-1]
    if T == 0:
        return torch.zeros(ids.shape, dtype=torch.int64)
    ids = ids.reshape(-1, T)  # (B, T)
    starts = np.empty(ids.shape, dtype=bool)
    starts[:, 0] = True
    starts[:, 1:] = ids[:, :-1] == eot_id
    t = np.arange(T)
    # index of the latest document start at or before each token
    first = np.maximum.accumulate(np.where(starts, t, 0), axis=1)  # (B, T)
    return torch.from_numpy(t - first).reshape(input_ids.shape)
