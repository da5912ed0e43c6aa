"""`get_batch` and `load_tokens`: the data half of the library for a loop of your own."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dsfm import get_batch, load_tokens
from dsfm.data.prepare import prepare


def test_windows_and_targets_from_a_memmap(tmp_path):
    path = tmp_path / "tokens.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)  # token i at offset i: offsets are visible
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    np.random.seed(0)
    x, y = get_batch(tokens, 8, 16, "cpu")
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert x.device.type == "cpu"
    starts = x[:, 0]
    assert torch.equal(x, starts[:, None] + torch.arange(16))  # contiguous windows
    assert torch.equal(y, x + 1)  # next-token targets
    # Uniform over every start that leaves room for the last target, and only those.
    _, y_all = get_batch(tokens, 20_000, 16, "cpu", rng=np.random.default_rng(1))
    firsts = y_all[:, 0] - 1
    assert firsts.min() == 0 and firsts.max() == 1000 - 16 - 1
    counts = torch.bincount(firsts, minlength=984).double()
    assert counts.std() / counts.mean() < 0.3  # ~20 per start: no start favoured
    a = get_batch(tokens, 4, 8, rng=np.random.default_rng(7))
    b = get_batch(tokens, 4, 8, rng=np.random.default_rng(7))
    assert torch.equal(a[0], b[0])


def test_bad_arguments_are_named():
    tokens = np.arange(10, dtype=np.uint16)
    with pytest.raises(ValueError, match="longer than context_length=10"):
        get_batch(tokens, 2, 10)
    with pytest.raises(ValueError, match="batch_size=0"):
        get_batch(tokens, 0, 4)


def test_load_tokens_of_a_prepared_split(byte_data, tmp_path):
    tokens = load_tokens(byte_data, "train")
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16 and len(tokens) > 1000
    x, _ = get_batch(tokens, 2, 32)
    assert int(x.max()) < 257
    with pytest.raises(ValueError, match="no split 'test'"):
        load_tokens(byte_data, "test")
    sharded = tmp_path / "sharded"
    prepare(
        ["stdlib"],
        sharded,
        tokenizer="byte",
        max_bytes=60_000,
        max_shard_bytes=20_000,
        progress=False,
    )
    with pytest.raises(ValueError, match="without --shard-size"):
        load_tokens(sharded)
    one = tmp_path / "one.txt"
    one.write_text("one small document\n")
    prepare([str(one)], tmp_path / "one", tokenizer="byte", val_fraction=0.0, progress=False)
    with pytest.raises(ValueError, match="split 'val' holds no tokens"):
        load_tokens(tmp_path / "one", "val")
