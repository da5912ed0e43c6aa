"""Tokenizer: exact round trips on any unicode, EOT handling, save/load, clear errors."""

from __future__ import annotations

import json

import pytest

from dsfm.data.corpus import stdlib_documents
from dsfm.data.tokenizer import EOT, Tokenizer, byte_tokenizer, train_bpe

TEXTS = [
    "",
    "hello world",
    "\n\n  \t",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nCRLF\r\n\x00nul\x7f",
    "emoji 🙂👩‍👩‍👧 and flags 🇫🇷",
    "CJK: 日本語のテキスト、中文文本，한국어",
    "combining: e\u0301 vs \u00e9, zero-width\u200bspace, BOM \ufeff",
    "def f(x):\n    return x  # ünïcödé\n",
    "literal <|endoftext|> inside a document",
]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe(stdlib_documents(max_bytes=200_000), vocab_size=600)


@pytest.fixture(scope="module", params=["byte", "bpe"])
def tok(request, bpe) -> Tokenizer:
    return byte_tokenizer() if request.param == "byte" else bpe


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_is_exact(tok, text):
    ids = tok.encode(text)
    assert tok.eot_id not in ids
    assert tok.decode(ids) == text


def test_decode_keeps_eot_between_documents(tok):
    a, b = TEXTS[5], TEXTS[2]
    ids = tok.encode(a) + [tok.eot_id] + tok.encode(b) + [tok.eot_id]
    assert tok.decode(ids) == a + EOT + b + EOT


def test_literal_eot_text_is_not_the_eot_token(tok):
    ids = tok.encode("x" + EOT + "y")
    assert tok.eot_id not in ids
    assert tok.decode(ids) == "x" + EOT + "y"


def test_encode_batch_matches_encode(tok):
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]


def test_byte_tokenizer_ids_are_byte_values():
    tok = byte_tokenizer()
    assert tok.vocab_size == 257
    assert tok.eot_id == 256
    text = "a é 🙂\n"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.decode(list(range(128))) == "".join(map(chr, range(128)))


def test_bpe_honours_vocab_size_and_compresses(bpe):
    assert bpe.vocab_size == 600
    assert 0 <= bpe.eot_id < 600
    text = next(stdlib_documents())
    assert len(bpe.encode(text)) < len(text.encode("utf-8")) / 2


def test_bpe_rejects_vocab_below_bytes_plus_eot():
    with pytest.raises(ValueError, match="at least 257"):
        train_bpe(["some text"], vocab_size=256)


@pytest.mark.parametrize("as_dir", [True, False])
def test_save_load_round_trip(tmp_path, tok, as_dir):
    path = tok.save(tmp_path / "tok")
    assert path == tmp_path / "tok" / "tokenizer.json"
    loaded = Tokenizer.load(path.parent if as_dir else path)
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.eot_id == tok.eot_id
    assert loaded.encode_batch(TEXTS) == tok.encode_batch(TEXTS)
    assert loaded.encode(EOT) != [loaded.eot_id]  # runtime setting survives a reload


def test_load_missing_path_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope.*tokenizer\.json"):
        Tokenizer.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="empty"):
        (tmp_path / "empty").mkdir()
        Tokenizer.load(tmp_path / "empty")


def test_load_corrupt_file_is_clear(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=str(bad)):
        Tokenizer.load(bad)


def test_load_tokenizer_without_eot_is_clear(tmp_path):
    path = byte_tokenizer().save(tmp_path)
    spec = json.loads(path.read_text())
    spec["added_tokens"] = []
    path.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="endoftext"):
        Tokenizer.load(path)
