"""Token arrays in: `.npy` and raw `.bin` ids (nanoGPT, CS336) become a dataset as they are."""

from __future__ import annotations

import numpy as np
import pytest

from dsfm.data.format import read_meta
from dsfm.data.prepare import prepare
from dsfm.data.stats import verify
from dsfm.data.tokenizer import Tokenizer, train_bpe


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A small trained BPE saved as tokenizer.json, and some documents' ids from it."""
    root = tmp_path_factory.mktemp("tok")
    docs = [f"Tale {i}: the cat sat on mat number {i * 7}.\nIt was happy.\n" for i in range(300)]
    tok = train_bpe(docs, 400)
    path = tok.save(root)
    ids = np.concatenate([np.array([*tok.encode(d), tok.eot_id]) for d in docs])
    return path, tok, docs, ids


def all_ids(out) -> np.ndarray:
    meta = read_meta(out)
    return np.concatenate(
        [np.fromfile(out / f"{s}.bin", dtype=meta["dtype"]) for s in ("train", "val")]
    )


def prep(path, out, tokenizer, **kw):
    return prepare([str(path)], out, tokenizer=str(tokenizer), progress=False, **kw)


def test_npy_becomes_a_dataset_without_retokenizing(tmp_path, bpe):
    tok_path, tok, docs, ids = bpe
    np.save(tmp_path / "tokens.npy", ids.astype(np.uint16))
    out = tmp_path / "out"
    meta = prep(tmp_path / "tokens.npy", out, tok_path, val_fraction=0.1)
    s = meta["splits"]
    assert s["train"]["docs"] + s["val"]["docs"] == len(docs)  # documents end at EOT
    assert 10 <= s["val"]["docs"] <= 60 and meta["val_cut_tokens"] == 0
    assert sorted(all_ids(out).tolist()) == sorted(ids.tolist())
    assert meta["sources"][0]["kind"] == "tokens"
    assert Tokenizer.load(out).vocab_size == tok.vocab_size
    assert verify(out) == []


def test_raw_uint16_bin_is_inferred_and_one_document_gets_a_val_cut(tmp_path, bpe):
    """nanoGPT's train.bin: uint16, no EOT at all (one document): EOT closes it and val is
    its end."""
    tok_path, tok, _, ids = bpe
    text_ids = ids[ids != tok.eot_id].astype(np.uint16)
    text_ids.tofile(tmp_path / "train.bin")
    out = tmp_path / "out"
    meta = prep(tmp_path / "train.bin", out, tok_path, val_fraction=0.1)
    s = meta["splits"]
    assert s["train"]["docs"] == s["val"]["docs"] == 1
    assert s["val"]["tokens"] == pytest.approx(0.1 * len(text_ids), abs=40)
    got = all_ids(out)
    assert got[got != tok.eot_id].tolist() == text_ids.tolist()
    assert verify(out) == []


def test_raw_uint32_is_ambiguous_until_dtype_is_given(tmp_path, bpe):
    tok_path, _, docs, ids = bpe
    ids.astype(np.uint32).tofile(tmp_path / "tokens.bin")
    with pytest.raises(ValueError, match=r"tokens.bin: .*both uint16 and uint32.*--dtype uint32"):
        prep(tmp_path / "tokens.bin", tmp_path / "a", tok_path)
    meta = prep(tmp_path / "tokens.bin", tmp_path / "b", tok_path, dtype="uint32")
    assert meta["splits"]["train"]["docs"] + meta["splits"]["val"]["docs"] == len(docs)
    assert meta["dtype"] == "uint16"  # stored in the smallest dtype the vocabulary allows
    (tmp_path / "odd.bin").write_bytes(ids.astype(np.uint16).tobytes()[:-2] + b"\x01")
    with pytest.raises(ValueError, match=r"odd.bin: .* not a whole number of uint16 ids"):
        prep(tmp_path / "odd.bin", tmp_path / "c", tok_path, dtype="uint16")


def test_out_of_vocabulary_id_names_file_and_offset(tmp_path, bpe):
    tok_path, tok, _, ids = bpe
    bad = ids.astype(np.uint16)
    bad[1234] = tok.vocab_size + 5
    np.save(tmp_path / "bad.npy", bad)
    out = tmp_path / "out"
    with pytest.raises(
        ValueError, match=rf"bad.npy: token id {tok.vocab_size + 5} at offset 1,234 is not below"
    ):
        prep(tmp_path / "bad.npy", out, tok_path)
    assert not out.exists()  # nothing half-written


def test_token_arrays_need_a_tokenizer_and_one_dimension(tmp_path, bpe):
    tok_path, _, _, ids = bpe
    np.save(tmp_path / "t.npy", ids.astype(np.uint16))
    with pytest.raises(ValueError, match=r"token arrays .*t.npy.* need --tokenizer"):
        prepare([str(tmp_path / "t.npy")], tmp_path / "a", progress=False)
    np.save(tmp_path / "2d.npy", ids[:100].reshape(10, 10).astype(np.uint16))
    with pytest.raises(ValueError, match=r"2d.npy: a token array must be 1-D integers"):
        prep(tmp_path / "2d.npy", tmp_path / "b", tok_path)
    with pytest.raises(ValueError, match=r"the .npy holds uint16, but --dtype says uint32"):
        prep(tmp_path / "t.npy", tmp_path / "c", tok_path, dtype="uint32")
