"""prepare: files → token streams that decode back to the source documents, atomically."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from dsfm.data.prepare import prepare
from dsfm.data.tokenizer import EOT, Tokenizer


def write_corpus(root: Path) -> list[str]:
    """Text, Markdown and JSONL files; returns their documents in prepare's order."""
    docs_a = "plain text with\n\n  \t whitespace and émoji 🙂\n"
    docs_b = "# notes\n\n日本語 and 中文 in markdown\n"
    jsonl_docs = ["first record", "second\nrecord with newline", "third 🚀 record"]
    (root / "a.txt").write_text(docs_a, encoding="utf-8")
    (root / "sub").mkdir()
    (root / "sub" / "b.md").write_text(docs_b, encoding="utf-8")
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(jsonl_docs)]
    lines.insert(1, "")  # a blank line is skipped, not an error
    lines.append(json.dumps({"text": ""}))  # an empty document is skipped
    (root / "sub" / "c.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    more = [f"document number {i} " * (i + 1) for i in range(12)]
    (root / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in more))
    (root / "ignored.bin").write_bytes(b"\xff\xfe not picked up from a directory")
    # Directory inputs are walked in sorted relative-path order.
    return [docs_a, *more, docs_b, *jsonl_docs]


def read_split(out_dir: Path, split: str, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.fromfile(out_dir / f"{split}.bin", dtype=np.dtype(meta["dtype"]))
    idx = np.fromfile(out_dir / f"{split}.idx", dtype=np.int64)
    return tokens, idx


def split_documents(out_dir: Path) -> dict[str, list[str]]:
    """Each split's documents (EOT included), recovered through its idx offsets."""
    meta = json.loads((out_dir / "meta.json").read_text())
    tok = Tokenizer.load(out_dir / meta["tokenizer"])
    docs = {}
    for split in ("train", "val"):
        tokens, idx = read_split(out_dir, split, meta)
        assert idx[0] == 0 and idx[-1] == len(tokens) == meta["splits"][split]["tokens"]
        assert len(idx) == meta["splits"][split]["docs"] + 1
        assert np.all(np.diff(idx) >= 2)  # at least one text token + EOT
        assert np.all(tokens[idx[1:] - 1] == meta["eot_id"])
        docs[split] = [tok.decode(tokens[s:e]) for s, e in zip(idx[:-1], idx[1:], strict=True)]
        assert tok.decode(tokens) == "".join(docs[split])
    return docs


def assert_documents_round_trip(out_dir: Path, expected: list[str]) -> dict[str, list[str]]:
    docs = split_documents(out_dir)
    expected = [d + EOT for d in expected]
    assert sorted(docs["train"] + docs["val"]) == sorted(expected)
    for split_docs in docs.values():  # each split keeps corpus order
        positions = [expected.index(d) for d in split_docs]
        assert positions == sorted(positions)
    return docs


@pytest.fixture
def corpus(tmp_path) -> tuple[Path, list[str]]:
    root = tmp_path / "corpus"
    root.mkdir()
    return root, write_corpus(root)


@pytest.mark.parametrize("tokenizer", ["byte", None])
def test_round_trip(tmp_path, corpus, tokenizer):
    root, expected = corpus
    out = tmp_path / "out"
    meta = prepare(
        [str(root)],
        out,
        tokenizer=tokenizer,
        vocab_size=300,
        val_fraction=0.3,
        seed=7,
        progress=False,
    )
    docs = assert_documents_round_trip(out, expected)
    assert docs["train"] and docs["val"]
    assert meta == json.loads((out / "meta.json").read_text())
    assert meta["format_version"] == 2
    assert meta["dtype"] == "uint16"
    assert meta["tokenizer"] == "tokenizer.json"
    assert meta["vocab_size"] == (257 if tokenizer == "byte" else 300)
    assert meta["vocab_size"] == Tokenizer.load(out).vocab_size
    assert (meta["text_key"], meta["val_fraction"], meta["seed"]) == ("text", 0.3, 7)
    assert meta["splits"]["train"]["docs"] + meta["splits"]["val"]["docs"] == len(expected)
    files = [root / "a.txt", root / "d.jsonl", root / "sub" / "b.md", root / "sub" / "c.jsonl"]
    assert meta["sources"] == [
        {
            "path": str(f.resolve()),
            "kind": "jsonl" if f.suffix == ".jsonl" else "text",
            "bytes": f.stat().st_size,
            "sha256": hashlib.sha256(f.read_bytes()).hexdigest(),
            "empty_docs": int(f.name == "c.jsonl"),
            "chars": chars,
        }
        for f, chars in zip(
            files,
            [
                len(expected[0]),
                sum(map(len, expected[1:13])),
                len(expected[13]),
                sum(map(len, expected[14:])),
            ],
        )
    ]
    assert meta["chars"] == sum(map(len, expected))
    assert meta["empty_docs"] == 1
    tok_bytes = (out / "tokenizer.json").read_bytes()
    assert meta["tokenizer_sha256"] == hashlib.sha256(tok_bytes).hexdigest()
    for split in ("train", "val"):
        (shard,) = meta["splits"][split]["shards"]
        assert shard["name"] == split
        assert shard["sha256"] == hashlib.sha256((out / f"{split}.bin").read_bytes()).hexdigest()
    assert sorted(p.name for p in out.iterdir()) == [
        ".verified.json",  # the hashes above, recorded for training's start-up check
        "meta.json",
        "tokenizer.json",
        "train.bin",
        "train.idx",
        "val.bin",
        "val.idx",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "out"]  # no temp dir left


def test_byte_tokens_are_utf8_bytes(tmp_path):
    (tmp_path / "x.txt").write_text("héllo")
    meta = prepare(
        [str(tmp_path / "x.txt")],
        tmp_path / "out",
        tokenizer="byte",
        val_fraction=0,
        progress=False,
    )
    tokens, idx = read_split(tmp_path / "out", "train", meta)
    assert tokens.tolist() == [*"héllo".encode(), 256]
    assert idx.tolist() == [0, 7]


def test_split_is_deterministic_by_seed(tmp_path, corpus):
    root, _ = corpus

    def assignment(name: str, seed: int) -> list[str]:
        prepare(
            [str(root)],
            tmp_path / name,
            tokenizer="byte",
            val_fraction=0.5,
            seed=seed,
            progress=False,
        )
        return split_documents(tmp_path / name)["val"]

    first = assignment("a", 1)
    assert assignment("b", 1) == first
    assert any(assignment(f"s{s}", s) != first for s in range(2, 6))


def test_each_split_gets_a_document(tmp_path, corpus):
    root, expected = corpus
    meta = prepare(
        [str(root)], tmp_path / "tiny", tokenizer="byte", val_fraction=1e-9, progress=False
    )
    assert meta["splits"]["val"]["docs"] == 1
    assert meta["splits"]["train"]["docs"] == len(expected) - 1
    meta = prepare(
        [str(root)], tmp_path / "huge", tokenizer="byte", val_fraction=0.999999, progress=False
    )
    assert meta["splits"]["train"]["docs"] == 1


def test_no_val_split(tmp_path, corpus):
    root, expected = corpus
    out = tmp_path / "out"
    meta = prepare([str(root)], out, tokenizer="byte", val_fraction=0, progress=False)
    assert {k: meta["splits"]["val"][k] for k in ("tokens", "docs")} == {"tokens": 0, "docs": 0}
    assert (out / "val.bin").stat().st_size == 0
    assert np.fromfile(out / "val.idx", dtype=np.int64).tolist() == [0]
    assert split_documents(out)["train"] == [d + EOT for d in expected]


def test_globs_files_and_reused_tokenizer(tmp_path, corpus):
    root, expected = corpus
    first = prepare([str(root)], tmp_path / "first", vocab_size=280, val_fraction=0, progress=False)
    inputs = [str(root / "**" / "*.jsonl"), str(root / "a.txt"), str(root / "a.txt")]
    meta = prepare(
        inputs,
        tmp_path / "second",
        tokenizer=str(tmp_path / "first"),
        val_fraction=0,
        progress=False,
    )
    assert [Path(s["path"]).name for s in meta["sources"]] == ["d.jsonl", "c.jsonl", "a.txt"]
    assert (meta["vocab_size"], meta["eot_id"]) == (first["vocab_size"], first["eot_id"])
    ordered = [*expected[1:13], *expected[14:], expected[0]]
    assert split_documents(tmp_path / "second")["train"] == [d + EOT for d in ordered]


def test_stdlib_with_max_bytes(tmp_path):
    meta = prepare(
        ["stdlib"],
        tmp_path / "out",
        tokenizer="byte",
        max_bytes=20_000,
        val_fraction=0.1,
        progress=False,
    )
    assert meta["sources"][0]["path"] == "stdlib"
    assert meta["sources"][0]["bytes"] == 20_000
    splits = meta["splits"]
    n_docs = splits["train"]["docs"] + splits["val"]["docs"]
    # Byte tokens: one per UTF-8 byte, plus one EOT per document.
    assert splits["train"]["tokens"] + splits["val"]["tokens"] == 20_000 + n_docs
    split_documents(tmp_path / "out")


def test_stdlib_with_bpe(tmp_path):
    meta = prepare(["stdlib"], tmp_path / "out", vocab_size=512, max_bytes=100_000, progress=False)
    assert meta["vocab_size"] == 512
    assert meta["splits"]["train"]["tokens"] < 100_000 / 2  # BPE compresses


def test_jsonl_missing_key_names_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text key"}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: no 'text' key \(found \['body'\]\)"):
        prepare([str(path)], tmp_path / "out", tokenizer="byte", progress=False)
    path.write_text('{"body": "one"}\n{"body": "two"}\n')
    meta = prepare([str(path)], tmp_path / "ok", tokenizer="byte", text_key="body", progress=False)
    assert meta["splits"]["train"]["docs"] + meta["splits"]["val"]["docs"] == 2


def test_jsonl_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(ValueError, match=rf"{path}:3: invalid JSON"):
        prepare([str(path)], tmp_path / "out", tokenizer="byte", progress=False)


def test_non_utf8_file_names_file_and_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{path}: not valid UTF-8 at byte offset 3"):
        prepare([str(path)], tmp_path / "out", tokenizer="byte", progress=False)


def test_existing_out_dir_needs_force(tmp_path, corpus):
    root, _ = corpus
    out = tmp_path / "out"
    prepare([str(root / "a.txt")], out, tokenizer="byte", progress=False)
    with pytest.raises(FileExistsError, match="force"):
        prepare([str(root)], out, tokenizer="byte", progress=False)
    meta = prepare([str(root)], out, tokenizer="byte", force=True, progress=False)
    assert json.loads((out / "meta.json").read_text()) == meta
    assert len(meta["sources"]) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "out"]


def test_force_refuses_a_directory_that_is_not_a_dataset(tmp_path, corpus):
    root, _ = corpus
    with pytest.raises(FileExistsError, match="does not look like a prepared dataset"):
        prepare([str(root / "a.txt")], root, tokenizer="byte", force=True, progress=False)
    assert (root / "a.txt").exists()


@pytest.mark.parametrize("where", ["file", "dir", "glob", "out itself", "link to it"])
def test_force_refuses_inputs_inside_the_output(tmp_path, corpus, capsys, where):
    """`--force` replaces the output whole: inputs inside it would go with it."""
    from dsfm.cli import main

    root, _ = corpus
    out = tmp_path / "out"
    meta = prepare([str(root / "a.txt")], out, tokenizer="byte", progress=False)
    (out / "raw").mkdir()
    mine = out / "raw" / "notes.txt"
    mine.write_text("my only copy\n")
    (tmp_path / "link.txt").symlink_to(mine)
    given = {
        "file": str(mine),
        "dir": str(out / "raw"),
        "glob": str(out / "raw" / "*.txt"),
        "out itself": str(out),
        "link to it": str(tmp_path / "link.txt"),
    }[where]
    argv = ["prepare", "--input", str(root / "a.txt"), given, "--out", str(out)]
    assert main([*argv, "--tokenizer", "byte", "--force"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "lies inside the output directory" in err, err
    assert mine.read_text() == "my only copy\n"
    assert json.loads((out / "meta.json").read_text()) == meta


@pytest.mark.parametrize("tokenizer", ["byte", None])
def test_failure_mid_prepare_leaves_nothing(tmp_path, corpus, tokenizer):
    root, _ = corpus
    # The bad line comes after many good documents, so tokens are already on disk.
    bad = root / "zz_bad.jsonl"
    bad.write_text(
        "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5000)) + "{broken\n"
    )
    before = sorted(tmp_path.iterdir())
    with pytest.raises(ValueError, match=r"zz_bad\.jsonl:5001"):
        prepare([str(root)], tmp_path / "out", tokenizer=tokenizer, vocab_size=300, progress=False)
    assert sorted(tmp_path.iterdir()) == before


def test_failed_forced_replace_keeps_old_dataset(tmp_path, corpus):
    root, _ = corpus
    out = tmp_path / "out"
    meta = prepare([str(root / "a.txt")], out, tokenizer="byte", progress=False)
    (root / "zz_bad.jsonl").write_text('{"text": "fine"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"zz_bad\.jsonl:2"):
        prepare([str(root)], out, tokenizer="byte", force=True, progress=False)
    assert json.loads((out / "meta.json").read_text()) == meta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "out"]


@pytest.mark.parametrize(
    ("inputs", "kwargs", "error", "match"),
    [
        ([], {}, ValueError, "no inputs"),
        (["{tmp}/missing.txt"], {}, FileNotFoundError, "does not exist"),
        (["{tmp}/*.nothing"], {}, FileNotFoundError, "matched no files"),
        (["{tmp}/emptydir"], {}, FileNotFoundError, "holds no"),
        (["{tmp}/empty.txt"], {}, ValueError, "empty corpus"),
        (["{tmp}/blank.jsonl"], {}, ValueError, "empty corpus"),
        (["stdlib"], {"val_fraction": 1.0}, ValueError, "val_fraction"),
        (["stdlib"], {"val_fraction": -0.1}, ValueError, "val_fraction"),
        (["stdlib"], {"tokenizer": None, "vocab_size": 100}, ValueError, "too small"),
        (["stdlib"], {"tokenizer": "{tmp}/no_tokenizer"}, FileNotFoundError, "no tokenizer"),
        (["stdlib"], {"max_bytes": 0}, ValueError, "max_bytes"),
    ],
)
def test_bad_arguments_fail_clearly(tmp_path, inputs, kwargs, error, match):
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    inputs = [i.format(tmp=tmp_path) for i in inputs]
    kwargs = {"tokenizer": "byte", **kwargs}
    if isinstance(kwargs["tokenizer"], str):
        kwargs["tokenizer"] = kwargs["tokenizer"].format(tmp=tmp_path)
    before = sorted(tmp_path.iterdir())
    with pytest.raises(error, match=match):
        prepare(inputs, tmp_path / "out", progress=False, **kwargs)
    assert sorted(tmp_path.iterdir()) == before
