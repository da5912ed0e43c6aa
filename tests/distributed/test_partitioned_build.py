"""ZeRO-3 builds a large model partitioned across 2 real ranks from `train.init_from` (read
tensor by tensor): each rank's host memory grows by well under one full fp32 copy of the
weights, and the first loss equals the whole model's (the same weights)."""

from __future__ import annotations

import json

import pytest
import torch

from dsfm.config.load import load_config, to_dict
from dsfm.interop.weights import save_plain
from dsfm.model.gpt import GPT
from dsfm.model.sizes import num_params
from tests.conftest import deepspeed_train

pytestmark = pytest.mark.distributed

# 208M parameters, 833 MB in fp32: far beyond the test presets, small enough for CI.
BIG = [
    "model.d_model=1024",
    "model.n_layers=16",
    "model.n_heads=8",
    "model.vocab_size=2048",
    "model.max_seq_len=64",
    "train.seq_len=32",
    "train.micro_batch_size=1",
    "train.precision=fp32",
    "train.seed=7",
]
MEMORY_FRACTION = 0.6  # of one full fp32 copy, per rank (its own partition is half)


def loss_of(model: GPT) -> float:
    ids = torch.arange(33) * 7 % model.cfg.vocab_size  # as partition_probe.first_loss
    with torch.no_grad():
        return model(ids[None, :-1], labels=ids[None, 1:]).item()


def test_zero3_builds_a_large_model_partitioned(byte_data, tmp_path):
    cfg = load_config(None, BIG)
    torch.manual_seed(1)  # not train.seed: loading the weights is told apart from drawing them
    source = GPT(cfg.model)
    init_from_loss = loss_of(source)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_bytes((byte_data / "tokenizer.json").read_bytes())
    plain = save_plain(tmp_path / "init", source.state_dict(), {"config": to_dict(cfg)}, tok)
    del source

    out = tmp_path / "run"
    deepspeed_train(
        "zero3",
        [*BIG, f"data.path={byte_data}", f"train.out_dir={out}", f"train.init_from={plain}"],
        port=29720,
        launcher="tests/distributed/partition_probe.py",
    )
    full_bytes = 4 * num_params(cfg.model)
    for rank in (0, 1):
        r = json.loads((out / f"partition_rank{rank}.json").read_text())
        assert r["n_params"] == num_params(cfg.model)
        assert r["rss_growth"] < MEMORY_FRACTION * full_bytes, (rank, r["rss_growth"] / full_bytes)
        assert r["init_from_loss"] == pytest.approx(init_from_loss, rel=1e-6, abs=1e-6)
