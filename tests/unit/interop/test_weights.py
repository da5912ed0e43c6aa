"""Weights read tensor by tensor (how training starts from `train.init_from`): a grown
vocabulary keeps every old row and starts the new ones at their mean; a model that does not
fit the checkpoint is refused before anything is copied."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dsfm.config.load import to_dict
from dsfm.config.schema import Config
from dsfm.data.tokenizer import byte_tokenizer
from dsfm.interop.weights import TensorSource, expected_shapes, save_plain
from dsfm.model.config import ModelConfig
from dsfm.model.gpt import GPT
from dsfm.train import checkpoint


def source_of(model: GPT, tmp_path) -> TensorSource:
    tokenizer = byte_tokenizer().save(tmp_path / "tok")
    state = {"config": to_dict(Config(model=model.cfg))}
    plain = save_plain(tmp_path / "plain", model.state_dict(), state, tokenizer)
    ckpt_dir, tag = checkpoint.resolve(plain)
    return TensorSource(ckpt_dir, tag, checkpoint.client_state(ckpt_dir, tag))


@pytest.mark.parametrize("tie", [False, True])
def test_a_grown_vocabulary_keeps_old_rows_and_starts_new_ones_at_their_mean(tmp_path, tie):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=64, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, tie_embeddings=tie
    )
    old = GPT(cfg).eval()
    source = source_of(old, tmp_path)
    torch.manual_seed(1)  # other random values, all to be overwritten
    grown = GPT(dataclasses.replace(cfg, vocab_size=68)).eval()
    source.check_fits(expected_shapes(grown.cfg), tie)
    for name, module in grown.named_modules():
        source.fill(name, module)

    for name in ("embed_tokens", "lm_head"):
        new, ref = getattr(grown, name).weight, getattr(old, name).weight
        assert new.shape == (68, 32)
        assert torch.equal(new[:64], ref)
        assert torch.allclose(new[64:], ref.mean(0).expand(4, -1))
    assert (grown.lm_head.weight is grown.embed_tokens.weight) == tie
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():  # every old id predicts what it did
        assert torch.allclose(grown(ids)[..., :64], old(ids), atol=1e-6)


def test_a_model_that_does_not_fit_is_refused(tmp_path):
    cfg = ModelConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=4)
    source = source_of(GPT(cfg), tmp_path)
    with pytest.raises(ValueError, match=r"embed_tokens.weight \(64, 32\) != \(60, 32\)"):
        source.check_fits(expected_shapes(dataclasses.replace(cfg, vocab_size=60)), False)
    with pytest.raises(ValueError, match=r"unexpected layers\.1\.input_layernorm\.weight"):
        source.check_fits(expected_shapes(dataclasses.replace(cfg, n_layers=1)), False)
