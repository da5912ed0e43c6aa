"""The dataset cache behind `dsfm train --data RAW` and the default corpus: prepared once,
reused while the inputs are unchanged, prepared again when they change, one preparer."""

from __future__ import annotations

import os
import threading
import time

import pytest

from dsfm.data import cache
from dsfm.data.format import META_FILE, read_meta

TEXT = "To be, or not to be, that is the question.\n" * 300


def later(path, seconds: float = 5.0) -> None:
    """Move a file's mtime forward (in the future: clocks need not agree)."""
    t = os.path.getmtime(path) + seconds
    os.utime(path, (t, t))


def test_one_file_prepared_once_reused_then_prepared_again(tmp_path):
    corpus = tmp_path / "input.txt"
    corpus.write_text(TEXT)
    said: list[str] = []
    kw = dict(vocab_size=None, prepare_here=True, say=said.append, progress=False)

    entry = cache.prepared([str(corpus)], tmp_path / "cache", **kw)
    meta = read_meta(entry)
    assert entry.parent == tmp_path / "cache" and entry.name.startswith("input-")
    assert meta["sources"][0]["path"] == str(corpus) and meta["vocab_size"] > 257
    assert said == [f"data: preparing {corpus} into {entry} (a BPE trained on it; done once)"]
    written = (entry / META_FILE).stat().st_mtime_ns
    assert cache.stale(entry, [str(corpus)]) is None

    # A second call, from another working directory with a relative path: the same entry.
    os.chdir(tmp_path)
    assert cache.prepared(["input.txt"], tmp_path / "cache", **kw) == entry
    assert "reusing it" in said[-1] and (entry / META_FILE).stat().st_mtime_ns == written

    later(corpus)  # touched: prepared again (contents are not re-read)
    assert cache.stale(entry, [str(corpus)]).startswith(f"{corpus} changed since")
    corpus.write_text(TEXT + "Whether 'tis nobler in the mind to suffer.\n")
    assert cache.prepared([str(corpus)], tmp_path / "cache", **kw) == entry
    assert said[-1].startswith(f"data: {corpus} changed since {entry.name} was prepared")
    assert read_meta(entry)["sources"][0]["bytes"] == len(corpus.read_bytes())
    assert cache.stale(entry, [str(corpus)]) is None
    assert not [p for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name]


def test_directory_gaining_a_file_and_vocab_size_key(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"{i}.txt").write_text(TEXT[: 2000 + 100 * i])
    root = tmp_path / "cache"
    said: list[str] = []
    kw = dict(prepare_here=True, say=said.append, progress=False)
    entry = cache.prepared([str(docs)], root, vocab_size=300, **kw)
    assert read_meta(entry)["vocab_size"] <= 300 and len(read_meta(entry)["sources"]) == 3
    # Another vocabulary is another entry; the first one stays.
    other = cache.prepared([str(docs)], root, vocab_size=400, **kw)
    assert other != entry and entry.is_dir()
    (docs / "3.txt").write_text("a new document\n")
    assert cache.stale(entry, [str(docs)]) == "the inputs changed (1 file(s) added, 0 removed)"
    cache.prepared([str(docs)], root, vocab_size=300, **kw)
    assert len(read_meta(entry)["sources"]) == 4


def test_a_broken_entry_is_prepared_again(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    kw = dict(vocab_size=300, prepare_here=True, say=lambda m: None, progress=False)
    entry = cache.prepared([str(corpus)], tmp_path, **kw)
    (entry / "train.bin").write_bytes(b"\0\0")  # truncated
    assert cache.stale(entry, [str(corpus)]).startswith("the cached dataset is unusable")
    cache.prepared([str(corpus)], tmp_path, **kw)
    assert cache.stale(entry, [str(corpus)]) is None
    cache._stamp_file(entry).write_text('{"half')  # a stamp cut short
    assert cache.stale(entry, [str(corpus)]).startswith("the cached dataset is unusable")
    cache.prepared([str(corpus)], tmp_path, **kw)
    assert cache.stale(entry, [str(corpus)]) is None


def test_one_preparer_the_others_wait(tmp_path):
    """Two preparers (two jobs, or two nodes' first ranks) and a waiting rank: one
    preparation, and nobody returns before the entry is complete."""
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT * 20)
    said: list[str] = []
    got: list = []

    def call(prepare_here: bool) -> None:
        entry = cache.prepared(
            [str(corpus)],
            tmp_path / "cache",
            vocab_size=300,
            prepare_here=prepare_here,
            say=said.append,
            progress=False,
            poll_s=0.01,
        )
        got.append((entry, cache.stale(entry, [str(corpus)])))

    threads = [threading.Thread(target=call, args=(p,)) for p in (False, True, True)]
    threads[0].start()
    time.sleep(0.1)  # the waiter is polling before anyone prepares
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(got) == 3 and len({e for e, _ in got}) == 1 and all(w is None for _, w in got)
    assert sum("preparing" in m for m in said) == 1 and sum("reusing" in m for m in said) == 1


def test_the_embedded_corpus_is_stamped_with_the_python_version(tmp_path, monkeypatch):
    kw = dict(vocab_size=None, prepare_here=True, say=lambda m: None, progress=False)
    monkeypatch.setattr("dsfm.data.corpus._unbounded_documents", lambda: iter([TEXT] * 30))
    entry = cache.prepared(["stdlib"], tmp_path, **kw)
    assert cache.stale(entry, ["stdlib"]) is None
    monkeypatch.setattr(cache.platform, "python_version", lambda: "9.99.0")
    assert cache.stale(entry, ["stdlib"]) == f"stdlib changed since {entry.name} was prepared"


def test_default_root_and_stdlib_entry(monkeypatch, tmp_path):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "c"))
    assert cache.default_root() == tmp_path / "c"
    monkeypatch.delenv(cache.CACHE_ENV)
    assert cache.default_root() == cache.Path.home() / ".cache" / "dsfm"
    assert cache.entry_dir(["stdlib"], tmp_path, None).name.startswith("stdlib-")
    glob_entry = cache.entry_dir([str(tmp_path / "books" / "*.txt")], tmp_path, None)
    assert glob_entry.name.startswith("books-")


def test_missing_input_names_it_before_anything_else(tmp_path):
    said: list[str] = []
    with pytest.raises(FileNotFoundError, match="nope.txt' does not exist"):
        cache.prepared(
            [str(tmp_path / "nope.txt")],
            tmp_path,
            vocab_size=None,
            prepare_here=True,
            say=said.append,
        )
    assert said == [] and list(tmp_path.iterdir()) == []  # no message, no lock file
