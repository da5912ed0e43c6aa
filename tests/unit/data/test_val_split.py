"""The val split from any corpus: whole documents when they can make it, else the end of
the corpus cut after a line end; empty splits open everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dsfm.data.dataset import TokenDataset
from dsfm.data.format import read_meta
from dsfm.data.prepare import prepare, split_note
from dsfm.data.stats import stats, verify
from dsfm.data.tokenizer import EOT, Tokenizer


def play(n_lines: int, seed: int = 0) -> str:
    """Shakespeare-like lines: one plain-text file, as every tutorial starts."""
    rng = np.random.default_rng(seed)
    words = "king queen lord shall thou thee night day love sword crown good".split()
    lines = [
        ("KING: " if i % 5 == 0 else "") + " ".join(rng.choice(words, rng.integers(3, 12)))
        for i in range(n_lines)
    ]
    return "\n".join(lines) + "\n"


def split_text(out: Path) -> dict[str, list[str]]:
    """Each split's documents decoded (EOT included)."""
    meta = read_meta(out)
    tok = Tokenizer.load(out)
    docs = {}
    for split in ("train", "val"):
        tokens = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])
        idx = np.fromfile(out / f"{split}.idx", dtype=np.int64)
        docs[split] = [tok.decode(tokens[a:b]) for a, b in zip(idx[:-1], idx[1:])]
    return docs


@pytest.mark.parametrize("val_fraction", [0.1, 0.01])  # 0.01 is prepare's default
def test_one_text_file_gets_val_of_the_requested_size(tmp_path, val_fraction):
    text = play(4000)
    (tmp_path / "input.txt").write_text(text)
    out = tmp_path / "shk"
    meta = prepare(
        [str(tmp_path / "input.txt")],
        out,
        tokenizer="byte",
        val_fraction=val_fraction,
        progress=False,
    )
    s = meta["splits"]
    total = s["train"]["tokens"] + s["val"]["tokens"]
    assert s["train"]["docs"] == s["val"]["docs"] == 1
    assert s["val"]["tokens"] == meta["val_cut_tokens"]
    # the requested share, give or take the line the cut moved back to
    assert abs(s["val"]["tokens"] - val_fraction * total) < 200
    docs = split_text(out)
    train, val = docs["train"][0], docs["val"][0]
    # The end of the corpus, cut after a line end: val is whole lines, and the two halves
    # (each closed by EOT) are the file.
    assert train.endswith("\n" + EOT) and val.endswith(EOT)
    assert train.removesuffix(EOT) + val.removesuffix(EOT) == text
    assert verify(out) == []
    assert "cut from train into val" in split_note(meta)


def test_one_document_bpe_and_sharded_split_cuts_the_last_shard(tmp_path):
    (tmp_path / "a.txt").write_text(play(3000, seed=1))
    (tmp_path / "b.txt").write_text(play(3000, seed=2))
    out = tmp_path / "out"
    meta = prepare(
        [str(tmp_path)],
        out,
        vocab_size=300,
        val_fraction=0.2,
        max_shard_bytes=20_000,  # each file is its own shard
        progress=False,
    )
    s = meta["splits"]
    assert len(s["train"]["shards"]) == 2
    total = s["train"]["tokens"] + s["val"]["tokens"]
    assert 0.15 * total < s["val"]["tokens"] < 0.25 * total
    assert verify(out) == []
    ds = TokenDataset(out, "val", seq_len=64)
    assert len(ds) > 10


def test_few_large_documents_never_give_val_most_of_the_corpus(tmp_path):
    """Three books, val_fraction 0.1: a whole book in val would be a third of the tokens."""
    for i in range(3):
        (tmp_path / f"book{i}.txt").write_text(play(1500, seed=i))
    for seed in range(6):
        out = tmp_path / f"out{seed}"
        meta = prepare(
            [str(tmp_path)], out, tokenizer="byte", val_fraction=0.1, seed=seed, progress=False
        )
        s = meta["splits"]
        share = s["val"]["tokens"] / (s["train"]["tokens"] + s["val"]["tokens"])
        assert 0.05 <= share <= 0.2, (seed, share)


def test_many_documents_stay_whole(tmp_path):
    lines = [json.dumps({"text": f"record {i}: " + play(3, seed=i)}) for i in range(400)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    meta = prepare(
        [str(tmp_path / "a.jsonl")], out, tokenizer="byte", val_fraction=0.1, progress=False
    )
    assert meta["val_cut_tokens"] == 0 and split_note(meta) is None
    docs = split_text(out)
    assert 20 < len(docs["val"]) < 80
    assert all(d.startswith("record ") for d in docs["train"] + docs["val"])


def test_empty_val_split_opens_everywhere_and_says_why(tmp_path):
    (tmp_path / "input.txt").write_text(play(500))
    out = tmp_path / "out"
    meta = prepare(
        [str(tmp_path / "input.txt")], out, tokenizer="byte", val_fraction=0, progress=False
    )
    assert meta["splits"]["val"]["tokens"] == 0
    assert verify(out) == []
    info = stats(out)["splits"]
    assert info["val"]["tokens"] == 0 and "doc_tokens" in info["train"]
    with pytest.raises(ValueError, match=r"'val' split .* is empty .*--val-fraction 0.01"):
        TokenDataset(out, "val", seq_len=16)
    assert "--val-fraction 0)" in split_note(meta)
