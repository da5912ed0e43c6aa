"""Validator: a document-masked model is validated with the masking it trains with."""

from __future__ import annotations

import pytest
import torch

from dsfm.config.schema import EvalConfig
from dsfm.data.blend import open_split
from dsfm.data.dataset import TokenDataset, doc_positions
from dsfm.data.prepare import prepare
from dsfm.data.tokenizer import byte_tokenizer
from dsfm.model.config import ModelConfig
from dsfm.model.gpt import GPT
from dsfm.train.validation import Validator


def test_val_loss_uses_document_masking_when_training_does(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(10):  # short documents: every window holds boundaries
        (src / f"d{i}.txt").write_text(f"doc {i} " + "ab" * (4 + i))
    data = tmp_path / "data"
    prepare([str(src)], data, tokenizer="byte", val_fraction=0, progress=False)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=257, n_layers=1, d_model=32, n_heads=2, max_seq_len=16))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # far from uniform attention, so masking visibly matters
    ds = TokenDataset(data, "train", 16)
    x, y = ds.inputs_and_labels(range(4))  # eval.batches x micro batch samples, in order
    with torch.no_grad():
        per_document = model(x, labels=y, positions=doc_positions(x, ds.eot_id)).item()
        causal = model(x, labels=y).item()
    assert abs(per_document - causal) > 1e-3

    blend = open_split([("docs", str(data), 1.0)], "train", 16, seed=None)
    for val_data in (ds, blend):
        for doc_mask, expected in ((True, per_document), (False, causal)):
            validator = Validator(
                EvalConfig(batches=2),
                val_data,
                byte_tokenizer(),
                chat=False,
                micro_batch_size=2,
                rank=0,
                world=1,
                device=torch.device("cpu"),
                seed=0,
                doc_mask=doc_mask,
            )
            assert validator.loss(model)["val_loss"] == pytest.approx(expected, rel=1e-6)
