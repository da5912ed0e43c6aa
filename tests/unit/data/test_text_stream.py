"""Plain-text files read in parts: documents at --doc-separator, long ones streamed."""

from __future__ import annotations

import numpy as np
import pytest

from dsfm.data import sources
from dsfm.data.format import read_meta
from dsfm.data.prepare import prepare
from dsfm.data.sources import SourceStats, read_documents, resolve_inputs
from dsfm.data.stats import verify
from dsfm.data.tokenizer import EOT, Tokenizer

SEP = "<|endoftext|>"


def stories(n: int) -> list[str]:
    return [f"Once upon a time {i} there was a cat 🐈 named Tom.\nThe end {i}.\n" for i in range(n)]


def decoded_docs(out) -> list[str]:
    meta, tok = read_meta(out), Tokenizer.load(out)
    docs = []
    for split in ("train", "val"):
        tokens = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])
        idx = np.fromfile(out / f"{split}.idx", dtype=np.int64)
        docs += [tok.decode(tokens[a:b]) for a, b in zip(idx[:-1], idx[1:])]
    return docs


def pieces(path, separator=None) -> list[tuple[str, int, bool]]:
    (source,) = resolve_inputs([str(path)])
    return list(read_documents(source, "text", None, SourceStats(), separator))


def test_separator_splits_a_file_in_small_chunks(tmp_path, monkeypatch):
    """Chunks much smaller than a document: separators and 4-byte characters straddle them."""
    monkeypatch.setattr(sources, "TEXT_PART_BYTES", 7)
    docs = stories(30)
    text = ("\n" + SEP + "\n").join(docs) + "\n" + SEP + "\n\n"  # a blank last "document"
    (tmp_path / "tiny.txt").write_text(text)
    got = pieces(tmp_path / "tiny.txt", SEP)
    assert all(len(t.encode()) <= 2 * 7 for t, _, _ in got)  # never more than a part or two
    whole, part = [], ""
    for t, _, end in got:
        part += t
        if end:
            whole.append(part)
            part = ""
    assert whole == [docs[0] + "\n", *("\n" + d + "\n" for d in docs[1:])]
    assert sum(n for _, n, _ in got) <= len(text.encode())


def test_separator_prepare_round_trips_documents(tmp_path):
    docs = stories(200)
    (tmp_path / "train.txt").write_text(SEP.join(docs))
    out = tmp_path / "out"
    meta = prepare(
        [str(tmp_path / "train.txt")],
        out,
        tokenizer="byte",
        doc_separator=SEP,
        val_fraction=0.05,
        progress=False,
    )
    assert meta["doc_separator"] == SEP and meta["val_cut_tokens"] == 0
    assert meta["splits"]["train"]["docs"] + meta["splits"]["val"]["docs"] == 200
    assert sorted(decoded_docs(out)) == sorted(d + EOT for d in docs)
    assert verify(out) == []


def test_a_document_larger_than_a_part_streams_whole(tmp_path, monkeypatch):
    """No separator: one document read in parts cut after line ends, EOT only at its end,
    and its tokens are those of the file (the byte tokenizer makes that exact)."""
    monkeypatch.setattr(sources, "TEXT_PART_BYTES", 4096)
    text = "".join(stories(2000))  # ~110 KB: ~27 parts
    (tmp_path / "book.txt").write_text(text)
    got = pieces(tmp_path / "book.txt")
    assert len(got) > 20 and [end for _, _, end in got] == [False] * (len(got) - 1) + [True]
    assert all(t.endswith("\n") for t, _, _ in got)
    out = tmp_path / "out"
    meta = prepare(
        [str(tmp_path / "book.txt")], out, tokenizer="byte", val_fraction=0.1, progress=False
    )
    assert meta["splits"]["train"]["docs"] == meta["splits"]["val"]["docs"] == 1
    assert "".join(decoded_docs(out)).replace(EOT, "") == text
    assert verify(out) == []


def test_bad_utf8_in_a_later_part_names_the_file_offset(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "TEXT_PART_BYTES", 64)
    raw = b"good line\n" * 50 + b"\xff bad\n"
    (tmp_path / "x.txt").write_bytes(raw)
    with pytest.raises(ValueError, match=r"x.txt: not valid UTF-8 at byte offset 500"):
        prepare([str(tmp_path / "x.txt")], tmp_path / "out", tokenizer="byte", progress=False)


def test_empty_separator_is_refused(tmp_path):
    (tmp_path / "x.txt").write_text("text")
    with pytest.raises(ValueError, match="doc_separator must be a non-empty string"):
        prepare([str(tmp_path / "x.txt")], tmp_path / "o", tokenizer="byte", doc_separator="")
