"""Evaluation: exact byte counts per token, bits per byte, whole-split checkpoint evals that
are deterministic, respect max_samples, refuse mismatched data and agree across 2 ranks.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dsfm.config.load import load_config, to_dict
from dsfm.data.corpus import stdlib_documents
from dsfm.data.dataset import TokenDataset, doc_positions
from dsfm.data.prepare import prepare
from dsfm.data.tokenizer import Tokenizer, byte_tokenizer, train_bpe
from dsfm.distributed.env import free_port
from dsfm.eval.loss import (
    eval_indices,
    evaluate_checkpoint,
    mean_loss,
    shard_indices,
    token_byte_lengths,
)
from dsfm.interop.weights import load_model, save_plain
from dsfm.model.gpt import GPT

UNICODE = [
    "héllo wörld — naïve café",
    "日本語のテキストと中文文本",
    "emoji 🚀🎉👩‍👩‍👧 and math ∮ E⋅da = Q",
    "def f(x):\n\treturn x ** 2  # 二乗\n",
]


def ascii_documents(n_bytes: int) -> list[str]:
    docs = [d for d in stdlib_documents(max_bytes=4 * n_bytes) if d.isascii()]
    return [d[: n_bytes // 2] for d in docs[:2]]


@pytest.fixture(scope="module")
def ascii_data(tmp_path_factory) -> Path:
    """Two ASCII-only documents (one per split) as byte tokens: one token per byte + EOTs."""
    src = tmp_path_factory.mktemp("ascii_src")
    for i, doc in enumerate(ascii_documents(40_000)):
        (src / f"doc{i}.txt").write_text(doc)
    out = tmp_path_factory.mktemp("data") / "ascii"
    prepare([str(src)], out, tokenizer="byte", val_fraction=0.5, progress=False)
    return out


def save_tiny(
    out: Path,
    tokenizer: Tokenizer,
    seed: int = 0,
    doc_mask: bool | None = None,
    std: float = 0.1,
) -> Path:
    cfg = load_config(
        None,
        [
            "model.d_model=32",
            "model.n_layers=2",
            "model.n_heads=2",
            "model.n_kv_heads=1",
            "model.max_seq_len=64",
            "train.seq_len=32",
        ],
    )
    cfg.model.vocab_size = tokenizer.vocab_size
    cfg.model.doc_mask = doc_mask
    torch.manual_seed(seed)
    model = GPT(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    tok_path = tokenizer.save(out.parent / f"{out.name}_tok")
    return save_plain(out, model.state_dict(), {"config": to_dict(cfg)}, tok_path)


@pytest.fixture(scope="module")
def byte_ckpt(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("ckpt") / "byte", byte_tokenizer())


# --- bytes per token ---------------------------------------------------------------------


def test_byte_tokenizer_lengths_are_exact():
    lengths = token_byte_lengths(byte_tokenizer())
    assert lengths.tolist() == [1] * 256 + [0]  # every byte, even a lone UTF-8 lead byte, is 1


def test_bpe_lengths_sum_to_utf8_length():
    texts = list(stdlib_documents(max_bytes=100_000)) + UNICODE * 20
    tok = train_bpe(texts, 1024)
    tok.hf_tokenizer.add_special_tokens(["<|user|>"])
    lengths = token_byte_lengths(tok)
    assert lengths.shape == (tok.vocab_size,)
    assert lengths[tok.eot_id] == 0 and lengths[tok.hf_tokenizer.token_to_id("<|user|>")] == 0
    partial = 0
    unseen = "runes ᚠᛇᚻ, hieroglyph 𓀀, ꙮ"  # not in training: split into single bytes
    for text in UNICODE + [unseen, texts[0][:2000]]:
        ids = tok.encode(text)
        assert lengths[ids].sum() == len(text.encode("utf-8")), text
        partial += sum("\ufffd" in tok.decode([i]) for i in ids)
    assert partial > 0  # some tokens hold part of a character: decoding alone would miscount
    # Documents joined by EOT: the separators stand for no text.
    ids = tok.encode(UNICODE[0]) + [tok.eot_id] + tok.encode(UNICODE[1])
    assert lengths[ids].sum() == len((UNICODE[0] + UNICODE[1]).encode("utf-8"))


# --- evaluate_checkpoint -----------------------------------------------------------------


def test_bpb_is_loss_over_ln2_for_ascii_bytes(byte_ckpt, ascii_data):
    ds = TokenDataset(ascii_data, "val", 32)
    # The split is one document and its EOT, the last token: stop before it.
    n = (ds.n_tokens - 2) // 32
    r = evaluate_checkpoint(byte_ckpt, ascii_data, max_samples=n)
    assert r["samples"] == n and r["tokens"] == r["bytes"] == n * 32
    assert r["bpb"] == pytest.approx(r["loss"] / math.log(2), rel=1e-12)
    assert r["ppl"] == pytest.approx(math.exp(r["loss"]))
    # Over the whole split the EOT target counts in the loss but adds no byte.
    full = evaluate_checkpoint(byte_ckpt, ascii_data)
    targets = np.concatenate([ds[i][1:] for i in range(len(ds))])
    assert full["tokens"] == len(targets)
    assert full["bytes"] == int((targets != ds.eot_id).sum())
    assert full["bpb"] == pytest.approx(full["loss"] * full["tokens"] / full["bytes"] / math.log(2))


def test_evaluate_checkpoint_deterministic_and_max_samples(byte_ckpt, ascii_data):
    a = evaluate_checkpoint(byte_ckpt, ascii_data, split="train", batch_size=3)
    b = evaluate_checkpoint(byte_ckpt, ascii_data, split="train", batch_size=3)
    assert a == b
    ds = TokenDataset(ascii_data, "train", 32)  # seq_len defaults to the checkpoint's 32
    assert a["samples"] == len(ds) and a["seq_len"] == 32 and a["split"] == "train"
    assert a["checkpoint"] == str(byte_ckpt)

    few = evaluate_checkpoint(byte_ckpt, ascii_data, split="train", max_samples=5, seq_len=16)
    assert few["samples"] == 5 and few["tokens"] == 5 * 16 and few["seq_len"] == 16
    # Same number as the model's own loss on those samples, and as the training eval's.
    model, _ = load_model(byte_ckpt)
    batch = TokenDataset(ascii_data, "train", 16).batch(range(5))
    with torch.no_grad():
        direct = model(batch[:, :-1], labels=batch[:, 1:]).item()
    assert few["loss"] == pytest.approx(direct, rel=1e-6)
    small = TokenDataset(ascii_data, "train", 16)
    # Different batch sizes sum the chunked loss in a different order: fp32 rounding only.
    assert mean_loss(model, small, list(range(5)), 2, torch.device("cpu")) == pytest.approx(
        few["loss"], rel=1e-6
    )
    with pytest.raises(ValueError, match="max_seq_len"):
        evaluate_checkpoint(byte_ckpt, ascii_data, seq_len=65)


def test_doc_masked_checkpoint_is_evaluated_with_its_masking(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):  # short documents: every window holds boundaries
        (src / f"d{i}.txt").write_text(f"document {i}: " + "xy" * (3 + 2 * i))
    data = tmp_path / "docs"
    prepare([str(src)], data, tokenizer="byte", val_fraction=0, progress=False)
    # Same seed, same weights: only the trained-with masking differs. Large weights make
    # attention far from uniform, so what a token may see visibly changes the loss.
    masked_ckpt = save_tiny(tmp_path / "masked", byte_tokenizer(), doc_mask=True, std=0.3)
    plain_ckpt = save_tiny(tmp_path / "plain", byte_tokenizer(), std=0.3)
    masked = evaluate_checkpoint(masked_ckpt, data, split="train")
    plain = evaluate_checkpoint(plain_ckpt, data, split="train")
    model, _ = load_model(tmp_path / "masked")
    ds = TokenDataset(data, "train", 32)
    x, y = ds.inputs_and_labels(range(len(ds)))
    with torch.no_grad():
        per_document = model(x, labels=y, positions=doc_positions(x, ds.eot_id)).item()
        causal = model(x, labels=y).item()
    assert masked["loss"] == pytest.approx(per_document, rel=1e-6)
    assert plain["loss"] == pytest.approx(causal, rel=1e-6)
    assert abs(per_document - causal) > 1e-3  # vs the 1e-6 the comparisons above allow


def test_vocab_mismatch_refused(tmp_path, byte_ckpt):
    data = tmp_path / "bpe_data"
    prepare(["stdlib"], data, vocab_size=1024, max_bytes=150_000, val_fraction=0.05, progress=False)
    with pytest.raises(ValueError, match="1024-token vocabulary, larger than the model's"):
        evaluate_checkpoint(byte_ckpt, data)
    # Same size, other merges: ids mean other text, so the numbers would be meaningless.
    other = train_bpe(UNICODE * 50 + list(stdlib_documents(max_bytes=60_000))[::-1], 1024)
    assert other.vocab_size == 1024
    with pytest.raises(ValueError, match="different tokenizer"):
        evaluate_checkpoint(save_tiny(tmp_path / "other", other), data)


# --- sharding ----------------------------------------------------------------------------


def test_shard_indices_cover_the_split_contiguously():
    for n, world in [(10, 3), (2, 4), (9, 1), (7, 7)]:
        parts = [shard_indices(n, r, world) for r in range(world)]
        assert sum(parts, []) == list(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    # The training eval keeps equal shards (ZeRO-3 forwards are collective).
    ds = type("DS", (), {"__len__": lambda self: 10})()
    assert [len(eval_indices(ds, 10, r, 3)) for r in range(3)] == [3, 3, 3]


RANK_SCRIPT = """
import json, os, sys
import torch.distributed as dist
from dsfm.eval.loss import evaluate_checkpoint
dist.init_process_group("gloo")
r = evaluate_checkpoint(sys.argv[1], sys.argv[2], split="train", batch_size=4,
                        max_samples=int(sys.argv[3]))
if dist.get_rank() == 0:
    print("RESULT " + json.dumps(r))
dist.destroy_process_group()
"""


def test_two_ranks_agree_with_one(byte_ckpt, ascii_data):
    # An odd count: the ranks get 1 sample apart, and every sample is still evaluated once.
    n = len(TokenDataset(ascii_data, "train", 32)) // 2 * 2 - 1
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
            "DS_ACCELERATOR": "cpu",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", RANK_SCRIPT, str(byte_ckpt), str(ascii_data), str(n)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    line = next(x for x in outs[0][0].splitlines() if x.startswith("RESULT "))
    two = json.loads(line.removeprefix("RESULT "))
    one = evaluate_checkpoint(byte_ckpt, ascii_data, split="train", batch_size=4, max_samples=n)
    assert one["samples"] == n
    assert {k: two[k] for k in ("tokens", "bytes", "samples")} == {
        k: one[k] for k in ("tokens", "bytes", "samples")
    }
    # Other batch boundaries and thread counts: equal up to fp32 summation order.
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert two["bpb"] == pytest.approx(one["bpb"], rel=1e-6)
