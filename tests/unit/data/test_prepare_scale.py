"""prepare at scale: compressed/Parquet/datasets inputs, parallel workers, shards, stats, verify."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dsfm.cli import main as cli_main
from dsfm.data.dataset import TokenDataset
from dsfm.data.format import VERIFIED_FILE, read_meta, shards
from dsfm.data.prepare import parse_size, prepare
from dsfm.data.stats import stats, verify
from dsfm.data.tokenizer import EOT, Tokenizer

DOCS = [
    f"document {i}: " + "lorem ipsum dolor sit amet, émoji 🙂 " * (1 + i % 7) for i in range(60)
]


def write_jsonl(path: Path, docs: list[str], key: str = "text") -> Path:
    path.write_text("".join(json.dumps({key: d, "n": i}) + "\n" for i, d in enumerate(docs)))
    return path


def documents(out: Path) -> list[str]:
    """All documents of both splits, shard by shard, decoded (EOT included)."""
    meta = read_meta(out)
    tok = Tokenizer.load(out)
    docs = []
    for split in meta["splits"]:
        for shard in shards(meta, split):
            tokens = np.fromfile(out / f"{shard['name']}.bin", dtype=meta["dtype"])
            idx = np.fromfile(out / f"{shard['name']}.idx", dtype=np.int64)
            docs += [tok.decode(tokens[a:b]) for a, b in zip(idx[:-1], idx[1:])]
    return docs


def prep(inputs, out, **kw):
    kw = {"tokenizer": "byte", "val_fraction": 0.2, "progress": False, **kw}
    return prepare([str(i) for i in inputs], out, **kw)


def test_compressed_jsonl_equals_plain(tmp_path):
    zstd = pytest.importorskip("zstandard")
    plain = write_jsonl(tmp_path / "a.jsonl", DOCS)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(plain.read_bytes()))
    (tmp_path / "c.jsonl.zst").write_bytes(zstd.ZstdCompressor().compress(plain.read_bytes()))
    metas = {}
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst"):
        metas[name] = prep([tmp_path / name], tmp_path / f"out-{name}")
        assert sorted(documents(tmp_path / f"out-{name}")) == sorted(d + EOT for d in DOCS)
    splits = [m["splits"] for m in metas.values()]
    assert splits[0] == splits[1] == splits[2]
    # provenance is the decompressed text, so the three describe the same content
    assert len({m["sources"][0]["sha256"] for m in metas.values()}) == 1


def test_truncated_gzip_is_a_clear_error(tmp_path):
    data = gzip.compress(write_jsonl(tmp_path / "a.jsonl", DOCS * 20).read_bytes())
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"bad\.jsonl\.gz: the compressed file is truncated"):
        prep([bad], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_parquet_equals_jsonl(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"id": list(range(len(DOCS))), "content": DOCS})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=7)
    write_jsonl(tmp_path / "a.jsonl", DOCS, key="content")
    a = prep([tmp_path / "a.parquet"], tmp_path / "pq", text_key="content")
    b = prep([tmp_path / "a.jsonl"], tmp_path / "js", text_key="content")
    assert a["splits"] == b["splits"]
    assert documents(tmp_path / "pq") == documents(tmp_path / "js")
    assert a["sources"][0]["bytes"] == sum(len(d.encode()) for d in DOCS)  # of the text
    assert (
        a["sources"][0]["sha256"]
        == hashlib.sha256((tmp_path / "a.parquet").read_bytes()).hexdigest()
    )
    with pytest.raises(
        ValueError, match=r"a\.parquet: no 'text' column \(found \['id', 'content'\]\)"
    ):
        prep([tmp_path / "a.parquet"], tmp_path / "x")
    with pytest.raises(ValueError, match=r"a\.parquet row 1: 'id' is a int, not a string"):
        prep([tmp_path / "a.parquet"], tmp_path / "y", text_key="id")


def test_hf_datasets_saved_dir_and_local_files(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    ds = datasets.Dataset.from_dict({"text": DOCS[:30] + ["", None] + DOCS[30:]})
    ds.save_to_disk(str(tmp_path / "saved"))
    write_jsonl(tmp_path / "ref.jsonl", DOCS)
    ref = prep([tmp_path / "ref.jsonl"], tmp_path / "ref")
    saved = prep([tmp_path / "saved"], tmp_path / "from-saved")
    assert saved["sources"][0]["kind"] == "hf" and saved["empty_docs"] == 2
    assert documents(tmp_path / "from-saved") == documents(tmp_path / "ref")
    assert saved["splits"] == ref["splits"]
    # hf:PATH[:SPLIT] goes through load_dataset, here on a local directory of JSONL files
    (tmp_path / "local").mkdir()
    write_jsonl(tmp_path / "local" / "train.jsonl", DOCS)
    loaded = prep([f"hf:{tmp_path / 'local'}:train"], tmp_path / "from-hf")
    assert documents(tmp_path / "from-hf") == documents(tmp_path / "ref")
    assert loaded["splits"] == ref["splits"]
    with pytest.raises(ValueError, match="could not load split 'nope'"):
        prep([f"hf:{tmp_path / 'local'}:nope"], tmp_path / "bad")


def test_workers_give_byte_identical_output(tmp_path, monkeypatch):
    import dsfm.data.prepare as prepare_module

    monkeypatch.setattr(prepare_module, "ENCODE_BATCH_DOCS", 4)  # many batches in flight
    write_jsonl(tmp_path / "a.jsonl", DOCS)
    (tmp_path / "b.txt").write_text("a plain text file\nwith two lines\n")
    outs = []
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}"
        prep([tmp_path / "a.jsonl", tmp_path / "b.txt"], out, workers=workers, max_shard_bytes=2000)
        files = sorted(p for p in out.iterdir() if p.name != VERIFIED_FILE)  # stat()s, not data
        outs.append({p.name: p.read_bytes() for p in files})
    assert outs[0] == outs[1] == outs[2]


def test_shards_stay_below_the_size_and_read_as_one_split(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", DOCS)
    whole = prep([tmp_path / "a.jsonl"], tmp_path / "whole", val_fraction=0)
    meta = prep([tmp_path / "a.jsonl"], tmp_path / "sharded", val_fraction=0, max_shard_bytes=1500)
    train = meta["splits"]["train"]
    assert len(train["shards"]) > 3
    assert (
        sum(s["tokens"] for s in train["shards"])
        == train["tokens"]
        == whole["splits"]["train"]["tokens"]
    )
    for s in train["shards"]:
        assert s["name"].startswith("train-")
        size = (tmp_path / "sharded" / f"{s['name']}.bin").stat().st_size
        assert size <= 1500 or s["docs"] == 1  # only a lone oversized document may exceed it
    assert documents(tmp_path / "sharded") == documents(tmp_path / "whole")
    assert [s["name"] for s in whole["splits"]["train"]["shards"]] == ["train"]

    seq_len = 16
    ds = TokenDataset(tmp_path / "sharded", "train", seq_len)
    expected = []
    for s in train["shards"]:  # windows never cross a shard boundary
        tokens = np.fromfile(tmp_path / "sharded" / f"{s['name']}.bin", dtype=np.uint16)
        expected += [
            tokens[i * seq_len : i * seq_len + seq_len + 1]
            for i in range((len(tokens) - 1) // seq_len)
        ]
    assert len(ds) == len(expected)
    order = np.random.default_rng(0).permutation(len(ds))
    got = ds.batch(order).numpy()
    assert np.array_equal(got, np.stack(expected)[order])
    x, y = ds.inputs_and_labels([0, len(ds) - 1, -1])
    assert np.array_equal(x.numpy(), got[np.argsort(order)][[0, -1, -1], :-1])
    assert np.array_equal(y.numpy()[:, :-1], x.numpy()[:, 1:])
    with pytest.raises(IndexError, match="out of range"):
        ds.batch([len(ds)])


def test_uint32_for_large_vocabularies(tmp_path):
    from dsfm.data.format import token_dtype
    from dsfm.data.tokenizer import byte_tokenizer

    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32
    tok = byte_tokenizer()
    tok.hf_tokenizer.add_special_tokens([f"<|extra_{i}|>" for i in range(65536 - 257)])
    assert tok.vocab_size == 65536
    tok.save(tmp_path / "tok")
    write_jsonl(tmp_path / "a.jsonl", DOCS)
    meta = prep([tmp_path / "a.jsonl"], tmp_path / "out", tokenizer=str(tmp_path / "tok"))
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 65536
    assert sorted(documents(tmp_path / "out")) == sorted(d + EOT for d in DOCS)
    x, _ = TokenDataset(tmp_path / "out", "train", 8).inputs_and_labels([0])
    assert x.dtype == torch.int64 and int(x.max()) < 256


def test_empty_documents_are_counted_and_an_all_empty_corpus_refused(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["", "x", ""])
    assert prep([tmp_path / "a.jsonl"], tmp_path / "out", val_fraction=0)["empty_docs"] == 2
    write_jsonl(tmp_path / "b.jsonl", ["", ""])
    with pytest.raises(ValueError, match="empty corpus"):
        prep([tmp_path / "b.jsonl"], tmp_path / "out2")


def test_a_swapped_tokenizer_is_refused(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", DOCS)
    out = tmp_path / "out"
    prep([tmp_path / "a.jsonl"], out)
    prep([tmp_path / "a.jsonl"], tmp_path / "bpe", tokenizer=None, vocab_size=300)
    (out / "tokenizer.json").write_bytes((tmp_path / "bpe" / "tokenizer.json").read_bytes())
    with pytest.raises(ValueError, match=r"tokenizer\.json is not the tokenizer that produced"):
        TokenDataset(out, "train", 8)
    assert "is not the tokenizer that produced" in verify(out)[0]


def test_stats_describe_the_data(tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", DOCS)
    out = tmp_path / "out"
    meta = prep([tmp_path / "a.jsonl"], out, max_shard_bytes=3000)
    s = stats(out, seed=1)
    for split in ("train", "val"):
        info = s["splits"][split]
        assert info["tokens"] == meta["splits"][split]["tokens"]
        assert sum(b["docs"] for b in info["length_histogram"]) == info["docs"]
        assert info["tokens_counted"] == info["tokens"]  # small: every token counted
        assert sum(t["share"] for t in info["top_tokens"]) <= 1.0
        sample = info["sample"]["text"].removesuffix("…")
        assert any(d.startswith(sample) for d in documents(out))
    # byte tokens: ids are UTF-8 bytes, the document text has one char per byte but for émoji
    chars = sum(map(len, DOCS))
    n_tokens = sum(len(d.encode()) for d in DOCS)
    assert s["tokens_per_char"] == pytest.approx(n_tokens / chars)
    assert s["splits"]["train"]["top_tokens"][0]["token"] == " "
    assert cli_main(["data", "stats", str(out)]) == 0
    assert "random document" in capsys.readouterr().out
    assert cli_main(["data", "stats", str(out), "--json"]) == 0
    assert (
        json.loads(capsys.readouterr().out)["splits"]["val"]["docs"]
        == meta["splits"]["val"]["docs"]
    )


def corrupt(out: Path, name: str, offset: int, value: bytes) -> None:
    with open(out / name, "r+b") as f:
        f.seek(offset)
        f.write(value)


def test_verify_finds_every_kind_of_damage(tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", DOCS)
    good = tmp_path / "good"
    meta = prep([tmp_path / "a.jsonl"], good, max_shard_bytes=3000)
    assert verify(good) == []
    assert cli_main(["data", "verify", str(good)]) == 0
    name = meta["splits"]["train"]["shards"][1]["name"]

    def damaged(tag: str) -> Path:
        out = tmp_path / tag
        out.mkdir()
        for p in good.iterdir():
            (out / p.name).write_bytes(p.read_bytes())
        return out

    out = damaged("ids")
    corrupt(out, f"{name}.bin", 40, np.array([9999], dtype=np.uint16).tobytes())
    problems = verify(out)
    assert any("sha256 differs" in p for p in problems)
    assert any(
        f"{name}.bin: token id 9999 at token offset 20 is not below the vocabulary size 257" in p
        for p in problems
    )

    out = damaged("offsets")
    corrupt(out, f"{name}.idx", 8, np.array([10**6], dtype=np.int64).tobytes())
    assert any(f"{name}.idx: document 1 has" in p for p in verify(out))

    out = damaged("eot")
    first_doc_end = int(np.fromfile(out / f"{name}.idx", dtype=np.int64)[1])
    corrupt(out, f"{name}.bin", 2 * (first_doc_end - 1), np.array([65], dtype=np.uint16).tobytes())
    assert any("document 0 (token offset 0) does not end with EOT id 256" in p for p in verify(out))

    out = damaged("truncated")
    with open(out / f"{name}.bin", "r+b") as f:
        f.truncate(10)
    problems = verify(out)
    assert len(problems) == 1 and "is 10 bytes but" in problems[0] and "truncated" in problems[0]
    assert cli_main(["data", "verify", str(out)]) == 1
    assert "FAIL" in capsys.readouterr().out
    with pytest.raises(ValueError, match="truncated"):
        TokenDataset(out, "train", 8)


@pytest.mark.parametrize(
    "text, size",
    [("500MB", 500 * 10**6), ("2GiB", 2 * 1024**3), ("1e6", 10**6), ("4096", 4096), ("1kb", 1000)],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


def test_a_failure_with_workers_leaves_nothing_behind(tmp_path, monkeypatch):
    import dsfm.data.prepare as prepare_module

    monkeypatch.setattr(prepare_module, "ENCODE_BATCH_DOCS", 4)  # batches in flight when it fails
    write_jsonl(tmp_path / "a.jsonl", DOCS)
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"b\.jsonl:2: invalid JSON"):
        prep([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], tmp_path / "out", workers=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl"]
