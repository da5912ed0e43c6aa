"""`save_checkpoint`/`load_checkpoint`: a hand-written loop's state in one safe file."""

from __future__ import annotations

import io
import pickle

import pytest
import torch

from dsfm import load_checkpoint, save_checkpoint
from dsfm.model.config import ModelConfig
from dsfm.model.gpt import GPT

CFG = ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, max_seq_len=16)


def parts(seed: int):
    torch.manual_seed(seed)
    model = GPT(CFG)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train(model, opt, steps: int) -> float:
    g = torch.Generator().manual_seed(steps)
    for _ in range(steps):
        x = torch.randint(0, 50, (2, 9), generator=g)
        loss = model(x[:, :-1], labels=x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


@pytest.mark.parametrize("to_file", [True, False], ids=["path", "file-object"])
def test_round_trip_resumes_exactly(tmp_path, to_file):
    model, opt = parts(0)
    train(model, opt, 3)
    out = tmp_path / "ckpt.pt" if to_file else io.BytesIO()
    save_checkpoint(model, opt, 3, out)
    if not to_file:
        out.seek(0)
    fresh, fresh_opt = parts(1)  # other weights, empty optimizer state
    assert load_checkpoint(out, fresh, fresh_opt) == 3
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # Same weights and same Adam moments: the next steps agree exactly.
    assert train(model, opt, 2) == train(fresh, fresh_opt, 2)
    if to_file:
        assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary left


def test_compiled_model_saves_the_model_it_wraps(tmp_path):
    model, opt = parts(0)
    wrapped = torch.nn.Module()
    wrapped._orig_mod = model  # what torch.compile's wrapper holds
    save_checkpoint(wrapped, opt, 7, tmp_path / "c.pt")
    plain, plain_opt = parts(2)
    assert load_checkpoint(tmp_path / "c.pt", plain, plain_opt) == 7
    assert torch.equal(plain.lm_head.weight, model.lm_head.weight)


class Payload:
    ran = False

    def __reduce__(self):
        return (Payload.mark, ())

    @staticmethod
    def mark():
        Payload.ran = True
        return "pwned"


def test_loading_runs_no_code_and_refuses_other_files(tmp_path):
    model, opt = parts(0)
    evil = tmp_path / "evil.pt"
    torch.save({"model": Payload(), "optimizer": {}, "iteration": 1}, evil)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(evil, model, opt)
    assert not Payload.ran
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a save_checkpoint file"):
        load_checkpoint(tmp_path / "other.pt", model, opt)
