"""Any Hugging Face tokenizer: its BOS/EOS/padding come from its own config files, the
document separator is the family's end of text, BOS starts each document where the family
expects it, and the prepared ids are the ones transformers gives."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from dsfm.data.format import read_meta, tokenizer_digest
from dsfm.data.prepare import prepare
from dsfm.data.tokenizer import Tokenizer, copy_tokenizer
from tests import family_tokenizers as families

transformers = pytest.importorskip("transformers")

DOCS = ["The quick brown fox.", "def add(a, b):\n    return a + b\n", "héllo wörld 🚀"]


def documents(data_dir):
    meta = read_meta(data_dir)
    dtype = np.dtype(meta["dtype"])
    tokens = np.fromfile(data_dir / "train.bin", dtype=dtype)
    offsets = np.fromfile(data_dir / "train.idx", dtype=np.int64)
    return [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]


def prepared(tmp_path, tokenizer, name="data"):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    out = tmp_path / name
    prepare([str(src)], out, tokenizer=str(tokenizer), val_fraction=0.0, progress=False)
    return out


@pytest.mark.parametrize(
    "family, separator, bos",
    [
        (lambda p: families.llama3(p), "<|end_of_text|>", "<|begin_of_text|>"),
        (lambda p: families.llama3(p, instruct=False), "<|end_of_text|>", "<|begin_of_text|>"),
        (lambda p: families.qwen2(p), "<|endoftext|>", None),
        (lambda p: families.qwen2(p, instruct=False), "<|endoftext|>", None),
        (families.mistral, "</s>", "<s>"),
    ],
    ids=["llama3-instruct", "llama3", "qwen2-instruct", "qwen2", "mistral"],
)
def test_prepare_uses_the_familys_own_special_tokens(tmp_path, family, separator, bos):
    tok_dir = family(tmp_path / "tok")
    hf = transformers.AutoTokenizer.from_pretrained(tok_dir)
    ours = Tokenizer.load(tok_dir)
    assert ours.token(ours.eot_id) == separator
    assert ours.token(ours.bos_id) == bos and ours.add_bos == (bos is not None)

    data = prepared(tmp_path, tok_dir)
    sep = hf.convert_tokens_to_ids(separator)
    # transformers' ids of each document (BOS where the family adds it) + the separator
    expected = [hf(d)["input_ids"] + [sep] for d in DOCS]
    assert sorted(documents(data)) == sorted(expected)
    if bos:
        assert all(doc[0] == hf.convert_tokens_to_ids(bos) for doc in expected)
    # the dataset's tokenizer keeps its roles, and its identity covers them
    again = Tokenizer.load(data)
    assert (again.eot_id, again.bos_id, again.add_bos) == (ours.eot_id, ours.bos_id, ours.add_bos)
    assert read_meta(data)["eot_id"] == sep


def test_a_tokenizer_file_brings_the_config_beside_it(tmp_path):
    tok_dir = families.mistral(tmp_path / "tok")
    data = prepared(tmp_path, tok_dir / "tokenizer.json")
    assert all(doc[0] == Tokenizer.load(tok_dir).bos_id for doc in documents(data))


def test_identity_covers_the_config_and_survives_copies(tmp_path):
    with_bos = families.mistral(tmp_path / "a")
    without = tmp_path / "b"
    shutil.copytree(with_bos, without)
    config = json.loads((without / "tokenizer_config.json").read_text())
    (without / "tokenizer_config.json").write_text(json.dumps(config | {"add_bos_token": False}))
    a, b = prepared(tmp_path, with_bos, "da"), prepared(tmp_path, without, "db")
    assert documents(a) != documents(b)  # same tokenizer.json, other ids...
    assert tokenizer_digest(a) != tokenizer_digest(b)  # ...so another identity
    # a run or checkpoint copy of the dataset's tokenizer has the dataset's identity
    copy = tmp_path / "ckpt"
    copy.mkdir()
    copy_tokenizer(a, copy)
    assert tokenizer_digest(copy) == tokenizer_digest(a) == read_meta(a)["tokenizer_sha256"]
    # and a changed config is caught like a changed tokenizer.json
    shutil.copyfile(without / "tokenizer_config.json", a / "tokenizer_config.json")
    with pytest.raises(ValueError, match="not the tokenizer that produced"):
        read_meta(a)


def test_a_cached_hub_id_is_a_tokenizer(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from tests.unit.test_hub import put_in_cache

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    src = families.qwen2(tmp_path / "tok")
    files = {p.name: p.read_text() for p in src.iterdir()}
    put_in_cache(cache, "org/qwen-tiny", files)
    data = prepared(tmp_path, "org/qwen-tiny")
    assert documents(data) == documents(prepared(tmp_path, src, "local"))
    with pytest.raises(ValueError, match="org/missing.*not in the Hugging Face cache"):
        prepared(tmp_path, "org/missing", "never")


def test_a_tokenizer_without_any_eos_is_refused_with_the_fix(tmp_path):
    tok_dir = families.qwen2(tmp_path / "tok", instruct=False)
    (tok_dir / "tokenizer_config.json").unlink()
    tok = json.loads((tok_dir / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<|endoftext|>"]
    (tok_dir / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="no end-of-sequence token.*tokenizer_config.json"):
        prepared(tmp_path, tok_dir)


def test_a_document_read_in_parts_gets_one_bos_and_one_separator(tmp_path, monkeypatch):
    """A text file larger than a part is one document: BOS before its first part only."""
    from dsfm.data import sources

    monkeypatch.setattr(sources, "TEXT_PART_BYTES", 64)
    tok_dir = families.llama3(tmp_path / "tok", instruct=False)
    ours = Tokenizer.load(tok_dir)
    (tmp_path / "book.txt").write_text("".join(f"line {i} of the book\n" for i in range(40)))
    out = tmp_path / "out"
    prepare(
        [str(tmp_path / "book.txt")], out, tokenizer=str(tok_dir), val_fraction=0.0, progress=False
    )
    (doc,) = documents(out)
    assert doc.count(ours.bos_id) == 1 and doc[0] == ours.bos_id
    assert doc.count(ours.eot_id) == 1 and doc[-1] == ours.eot_id
