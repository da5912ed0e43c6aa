"""Token arrays as `dsfm prepare` inputs: a `.npy` or raw `.bin` of ids (nanoGPT, CS336).

Design choices:
- The ids are taken as they are, with the tokenizer the user names: nothing is decoded or
  re-tokenized. Every id is checked against that tokenizer's vocabulary as it is copied,
  and the first bad one is an error naming the file and its offset.
- A `.npy` says its own dtype. A raw `.bin` does not: `--dtype uint16|uint32` names it, or
  it is inferred only when exactly one of the two reads the file's size and first ids as
  valid (a uint16 file read as uint32 pairs ids into values far past any vocabulary, but a
  uint32 file read as uint16 looks valid, so that case is refused, asking for --dtype).
- Documents end at the tokenizer's EOT id, which stays in the stream; an array that does
  not end with EOT gets one, so every document in the dataset ends with it.
- The array is memory-mapped and read in chunks, so its size is bounded by the disk only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

RAW_DTYPES = ("uint16", "uint32")
CHUNK_TOKENS = 1 << 20
SNIFF_TOKENS = 1 << 20  # ids read to infer a raw file's dtype


def open_token_array(path: str, dtype: str | None, vocab_size: int) -> np.ndarray:
    """The file's ids, memory-mapped; the dtype from the `.npy` header, `dtype`, or
    inferred (see the module doc). Errors name the file and the fix."""
    if dtype is not None and dtype not in RAW_DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {', '.join(RAW_DTYPES)}")
    if path.endswith(".npy"):
        return _open_npy(path, dtype)
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"{path}: the token file is empty")
    if dtype is None:
        dtype = _infer_dtype(path, size, vocab_size)
    itemsize = np.dtype(dtype).itemsize
    if size % itemsize:
        raise ValueError(
            f"{path}: {size:,} bytes is not a whole number of {dtype} ids; "
            f"check --dtype (the file may be {RAW_DTYPES[1 - RAW_DTYPES.index(dtype)]})"
        )
    return np.memmap(path, dtype=dtype, mode="r")


def _open_npy(path: str, dtype: str | None) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{path}: not a readable .npy array ({e})") from None
    if array.ndim != 1 or array.dtype.kind not in "ui":
        raise ValueError(
            f"{path}: a token array must be 1-D integers, this one is {array.dtype} with "
            f"shape {array.shape}"
        )
    if dtype is not None and np.dtype(dtype) != array.dtype:
        raise ValueError(
            f"{path}: the .npy holds {array.dtype}, but --dtype says {dtype}; drop --dtype "
            "(a .npy names its own)"
        )
    if array.size == 0:
        raise ValueError(f"{path}: the token array is empty")
    return array


def _infer_dtype(path: str, size: int, vocab_size: int) -> str:
    readable = []
    for name in RAW_DTYPES:
        itemsize = np.dtype(name).itemsize
        if size % itemsize == 0:
            head = np.fromfile(path, dtype=name, count=min(SNIFF_TOKENS, size // itemsize))
            if int(head.max()) < vocab_size:
                readable.append(name)
    if len(readable) == 1:
        return readable[0]
    if not readable:
        raise ValueError(
            f"{path}: read as uint16 or as uint32, the first ids are not all below the "
            f"vocabulary size {vocab_size}; pass the tokenizer that made the file "
            "(--tokenizer) and its dtype (--dtype)"
        )
    raise ValueError(
        f"{path}: a raw .bin has no dtype, and both uint16 and uint32 read it as valid ids; "
        "pass --dtype uint16 (nanoGPT's files) or --dtype uint32"
    )


def token_documents(
    path: str, array: np.ndarray, vocab_size: int, eot_id: int, out_dtype: np.dtype
) -> Iterator[tuple[np.ndarray, int, bool]]:
    """Yield `(ids, input bytes consumed, end)`: documents (through EOT) or parts of one,
    ids checked and cast to `out_dtype`; EOT closes a last document that lacks one."""
    per_token = os.path.getsize(path) / len(array)
    open_doc = False
    for start in range(0, len(array), CHUNK_TOKENS):
        chunk = np.asarray(array[start : start + CHUNK_TOKENS])
        bad = np.flatnonzero((chunk >= vocab_size) | (chunk < 0))
        if len(bad):
            at = start + int(bad[0])
            raise ValueError(
                f"{path}: token id {int(array[at])} at offset {at:,} is not below the vocabulary "
                f"size {vocab_size}; the ids were made by another tokenizer (pass it with "
                "--tokenizer), or a raw .bin has another dtype (--dtype)"
            )
        ids = chunk.astype(out_dtype)
        stops = [*(np.flatnonzero(ids == eot_id) + 1).tolist(), len(ids)]
        consumed = round(len(ids) * per_token)
        piece_start = 0
        for stop in stops:
            if stop > piece_start:
                end = bool(ids[stop - 1] == eot_id)
                yield ids[piece_start:stop], consumed, end
                consumed, open_doc = 0, not end
            piece_start = stop
    if open_doc:
        yield np.array([eot_id], dtype=out_dtype), 0, True
