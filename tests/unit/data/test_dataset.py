"""TokenDataset: packed windows over a real prepared split, and clear errors on bad data;
doc_positions: where documents start inside a window."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from dsfm.data.dataset import TokenDataset, doc_positions
from dsfm.data.format import read_meta
from dsfm.data.prepare import prepare

TEXT = "".join(f"line {i}: the quick brown fox 🦊\n" for i in range(40))


@pytest.fixture
def data_dir(tmp_path) -> Path:
    (tmp_path / "doc.txt").write_text(TEXT)
    out = tmp_path / "data"
    prepare([str(tmp_path / "doc.txt")], out, tokenizer="byte", val_fraction=0, progress=False)
    return out


def stream() -> np.ndarray:
    """What the byte tokenizer writes for TEXT: its UTF-8 bytes, then EOT (256)."""
    return np.array([*TEXT.encode("utf-8"), 256], dtype=np.int64)


@pytest.mark.parametrize("seq_len", [1, 7, 64, 333])
def test_samples_are_packed_windows(data_dir, seq_len):
    ds = TokenDataset(data_dir, "train", seq_len)
    tokens = stream()
    assert ds.n_tokens == len(tokens)
    assert len(ds) == (len(tokens) - 1) // seq_len
    assert (ds.vocab_size, ds.eot_id) == (257, 256)
    for i in [0, 1, len(ds) - 1]:
        sample = ds[i]
        assert sample.dtype == np.int64 and sample.shape == (seq_len + 1,)
        np.testing.assert_array_equal(sample, tokens[i * seq_len : i * seq_len + seq_len + 1])
    # Consecutive samples overlap by exactly one token: each target is also the next input.
    if len(ds) > 1:
        assert ds[0][-1] == ds[1][0]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_batch_stacks_samples(data_dir):
    ds = TokenDataset(data_dir, "train", 16)
    batch = ds.batch([3, 0, 3, len(ds) - 1])
    assert batch.dtype == torch.long and batch.shape == (4, 17)
    for row, i in zip(batch, [3, 0, 3, len(ds) - 1], strict=True):
        np.testing.assert_array_equal(row.numpy(), ds[i])


def test_short_split_is_a_clear_error(data_dir):
    n = len(stream())
    TokenDataset(data_dir, "train", n - 1)  # exactly one sample fits
    with pytest.raises(ValueError, match=rf"has {n} tokens.*needs {n + 1}"):
        TokenDataset(data_dir, "train", n)
    with pytest.raises(ValueError, match=r"is empty \(prepared with --val-fraction 0\)"):
        TokenDataset(data_dir, "val", 8)
    with pytest.raises(ValueError, match="no 'test' split"):
        TokenDataset(data_dir, "test", 8)


def test_pickles_without_copying_tokens(data_dir):
    ds = TokenDataset(data_dir, "train", 8)
    assert len(pickle.dumps(ds)) < ds.n_tokens  # the memmap is reopened, not serialized
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone[5], ds[5])


def test_read_meta_errors_name_the_file(tmp_path, data_dir):
    assert read_meta(data_dir)["splits"]["train"]["tokens"] == len(stream())
    with pytest.raises(FileNotFoundError, match="dsfm prepare"):
        read_meta(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"meta\.json.*dsfm prepare"):
        read_meta(tmp_path)
    bin_path = data_dir / "train.bin"
    bin_path.write_bytes(bin_path.read_bytes()[:-2])
    with pytest.raises(ValueError, match=rf"{bin_path}.*dsfm prepare"):
        read_meta(data_dir)


def test_read_meta_rejects_unknown_format(data_dir):
    meta = json.loads((data_dir / "meta.json").read_text())
    meta["format_version"] = 99
    (data_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version 99"):
        read_meta(data_dir)


def test_an_id_beyond_the_vocabulary_is_refused_naming_the_file(data_dir):
    """Damage that keeps the file's size: caught as the batch is read, on the host, with the
    file named (on a GPU the model does not read ids back to check them)."""
    tokens = np.memmap(data_dir / "train.bin", dtype=np.uint16, mode="r+")
    tokens[100] = 300  # vocabulary: 257
    tokens.flush()
    ds = TokenDataset(data_dir, "train", 16)
    x, _ = ds.inputs_and_labels([0, 1, 2])  # before the damage: fine
    assert x.max() < 257
    with pytest.raises(ValueError, match=r"train\.bin: a token id of sample 6 .* not below"):
        ds.inputs_and_labels([0, 6])


# --- document positions (model.doc_mask) -------------------------------------------------

E = 9  # the EOT id of the hand-written windows


@pytest.mark.parametrize(
    "window, expected",
    [
        # starts mid-document (position 0 all the same), several EOTs, two in a row (a
        # document that is only its EOT)
        ([5, 6, E, 7, 8, E, E, 1], [0, 1, 2, 0, 1, 2, 0, 0]),
        ([1, 2, E], [0, 1, 2]),  # EOT at the end: it belongs to the document it ends
        ([E, 3, 4], [0, 0, 1]),  # EOT first: the next token starts a document
        ([3, 4, 5, 6], [0, 1, 2, 3]),  # no EOT: one document
        ([E], [0]),
    ],
)
def test_doc_positions_restart_after_each_eot(window, expected):
    pos = doc_positions(torch.tensor([window]), E)
    assert pos.dtype == torch.long
    assert pos.tolist() == [expected]


def test_doc_positions_per_row_and_any_leading_shape():
    x = torch.tensor([[1, E, 2, 3], [4, 5, 6, E]])
    assert doc_positions(x, E).tolist() == [[0, 1, 0, 1], [0, 1, 2, 3]]
    assert doc_positions(x[0], E).tolist() == [0, 1, 0, 1]
    assert doc_positions(torch.zeros(2, 0, dtype=torch.long), E).shape == (2, 0)


def test_doc_positions_of_real_windows(tmp_path):
    """Windows cut anywhere in a prepared stream of several documents: positions count from
    the last EOT before each token, or from the window's start."""
    for i, n in enumerate([5, 40, 3, 17, 60, 1]):
        (tmp_path / f"doc{i}.txt").write_text("ab" * n)
    out = tmp_path / "data"
    prepare([str(tmp_path)], out, tokenizer="byte", val_fraction=0, progress=False)
    for seq_len in (7, 32):
        ds = TokenDataset(out, "train", seq_len)
        x, _ = ds.inputs_and_labels(range(len(ds)))
        pos = doc_positions(x, ds.eot_id)
        for row, got in zip(x.tolist(), pos.tolist()):
            expected, p = [], 0
            for token in row:
                expected.append(p)
                p = 0 if token == ds.eot_id else p + 1
            assert got == expected
    assert (x[:, :-1] == ds.eot_id).any()  # some window holds a document boundary
