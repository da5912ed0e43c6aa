"""Tokenizing documents in batches, here or in worker processes, always in order.

Design choices:
- Documents are encoded in batches of about `ENCODE_BATCH_BYTES` of text: large enough for
  the tokenizer's own thread pool to pay off, small enough to keep memory flat.
- `workers > 1` tokenizes batches in that many processes (one tokenizer thread each) while
  the caller reads, assigns splits and writes. Batches go out and come back in order, so
  the output is byte-identical whatever the worker count.
- Every document ends with the tokenizer's separator (EOT), so documents can be packed
  back to back and the model learns where they end; it starts with BOS where the family
  expects one (`Tokenizer.add_bos`: Llama yes, Qwen no), as the model saw in pretraining.
  A document read in parts (a text file larger than a part) gets its BOS before its first
  part and its EOT after its last part only.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor

import numpy as np

from dsfm.data.tokenizer import Tokenizer

ENCODE_BATCH_BYTES = 1 << 20
ENCODE_BATCH_DOCS = 4096


def encode_docs(
    tokenizer: Tokenizer, dtype: np.dtype, batch: list[str], starts: list[bool], ends: list[bool]
) -> tuple:
    """A batch of documents (or parts: `starts[i]` False when it continues a document,
    `ends[i]` False when more of it follows) as one flat token array ([BOS] before each
    document's start where the family has one, EOT after its end) and the pieces' lengths."""
    ids = tokenizer.encode_batch(batch)
    bos = np.asarray(starts, dtype=np.int64) * int(tokenizer.add_bos)
    eots = np.asarray(ends, dtype=np.int64)
    lengths = np.fromiter((len(d) for d in ids), dtype=np.int64, count=len(ids)) + bos + eots
    flat = np.empty(int(lengths.sum()), dtype=dtype)
    stops = np.cumsum(lengths)
    flat[(stops - 1)[eots == 1]] = tokenizer.eot_id
    if bos.any():
        flat[(stops - lengths)[bos == 1]] = tokenizer.bos_id
    for doc, stop, n in zip(ids, stops - eots, map(len, ids)):
        flat[stop - n : stop] = doc
    return flat, lengths


_worker_tokenizer: Tokenizer | None = None
_worker_dtype: np.dtype | None = None


def _init_worker(tokenizer_json: str, config: dict, dtype: str) -> None:
    global _worker_tokenizer, _worker_dtype
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the processes
    import tokenizers

    _worker_tokenizer = Tokenizer(tokenizers.Tokenizer.from_str(tokenizer_json), config)
    _worker_dtype = np.dtype(dtype)


def _encode_in_worker(batch: list[str], starts: list[bool], ends: list[bool]) -> tuple:
    return encode_docs(_worker_tokenizer, _worker_dtype, batch, starts, ends)


class BatchEncoder:
    """Encodes document batches in submission order, here or in `workers` processes.

    At most `2 * workers` batches are in flight, so a slow tokenizer never lets the reader
    run ahead and fill memory. Workers are forked on Linux: spawned ones would re-import the
    caller's `__main__`, which breaks scripts without a main guard and stdin scripts.
    TOKENIZERS_PARALLELISM=false while they live gives each one tokenizer thread (the
    parallelism is the processes) and keeps the tokenizer's fork warning quiet.
    """

    def __init__(self, tokenizer: Tokenizer, dtype: np.dtype, workers: int) -> None:
        self.tokenizer, self.dtype, self.workers = tokenizer, dtype, workers
        self.pool = None
        self.pending: deque[Future] = deque()
        self._saved_env = os.environ.get("TOKENIZERS_PARALLELISM")
        if workers > 1:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            method = "fork" if sys.platform == "linux" else "spawn"
            self.pool = ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context(method),
                initializer=_init_worker,
                initargs=(tokenizer.hf_tokenizer.to_str(), tokenizer.config, dtype.name),
            )

    def submit(self, batch: list[str], starts: list[bool], ends: list[bool]) -> Iterator[tuple]:
        """Queue `batch`; yield the results that are due, oldest first."""
        if self.pool is None:
            yield encode_docs(self.tokenizer, self.dtype, batch, starts, ends)
            return
        self.pending.append(self.pool.submit(_encode_in_worker, batch, starts, ends))
        while len(self.pending) > 2 * self.workers:
            yield self.pending.popleft().result()

    def drain(self) -> Iterator[tuple]:
        while self.pending:
            yield self.pending.popleft().result()

    def close(self) -> None:
        if self.pool is None:
            return
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self._saved_env is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = self._saved_env
