"""LoRA: adapters train alone, start as the identity, merge exactly; masked tokens teach nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dsfm.data.chat import add_chat_tokens, render
from dsfm.data.dataset import masked_labels
from dsfm.data.tokenizer import byte_tokenizer
from dsfm.model.config import LORA_TARGETS, ModelConfig
from dsfm.model.gpt import GPT, IGNORE_INDEX
from dsfm.model.lora import (
    LORA_PARAMS,
    LoRALinear,
    apply_lora,
    merge_state_dict,
)

RANK, ALPHA = 4, 8.0


def tiny_model(tie: bool = False, vocab_size: int = 64) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=vocab_size,
        n_layers=2,
        d_model=32,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=128,
        tie_embeddings=tie,
    )
    return GPT(cfg)


def batch(vocab_size: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (2, 17), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def randomize_adapters(model: nn.Module) -> None:
    """B = 0 at init makes every merge trivially right; give the adapters real values."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in (p for n, p in model.named_parameters() if n.endswith(LORA_PARAMS)):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_apply_lora_trains_only_adapters_and_keeps_names():
    model = tiny_model(tie=True)
    base_names = set(model.state_dict())
    weights = {n: m.weight for n, m in model.named_modules() if n.endswith(LORA_TARGETS)}

    replaced = apply_lora(model, rank=RANK, alpha=ALPHA, dropout=0.0)
    assert sorted(replaced) == sorted(weights) and len(replaced) == 2 * 7
    for name in replaced:
        module = model.get_submodule(name)
        assert isinstance(module, LoRALinear) and module.weight is weights[name]  # no copy
    lora_names = {f"{n}.{p}" for n in replaced for p in ("lora_A", "lora_B")}
    assert set(model.state_dict()) == base_names | lora_names
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == lora_names
    assert not model.embed_tokens.weight.requires_grad and not model.norm.weight.requires_grad
    a = model.get_submodule(replaced[0])
    assert a.lora_A.shape == (RANK, a.in_features) and a.lora_B.shape == (a.out_features, RANK)


def test_targets_pick_modules_by_name_suffix():
    model = tiny_model()
    replaced = apply_lora(model, rank=2, alpha=2.0, dropout=0.1, targets=["q_proj", "mlp.up_proj"])
    assert replaced == [
        "layers.0.self_attn.q_proj",
        "layers.0.mlp.up_proj",
        "layers.1.self_attn.q_proj",
        "layers.1.mlp.up_proj",
    ]
    assert isinstance(model.layers[0].self_attn.k_proj, nn.Linear)
    assert not isinstance(model.layers[0].self_attn.k_proj, LoRALinear)


def test_apply_lora_refuses_bad_arguments():
    with pytest.raises(ValueError, match=r"unknown LoRA targets \['qproj'\].*'q_proj'"):
        apply_lora(tiny_model(), rank=4, alpha=8.0, dropout=0.0, targets=["qproj"])
    with pytest.raises(ValueError, match="rank must be >= 1"):
        apply_lora(tiny_model(), rank=0, alpha=8.0, dropout=0.0)
    with pytest.raises(ValueError, match="lm_head.weight is shared"):
        apply_lora(tiny_model(tie=True), rank=4, alpha=8.0, dropout=0.0, targets=["lm_head"])
    model = tiny_model()
    apply_lora(model, rank=4, alpha=8.0, dropout=0.0)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, rank=4, alpha=8.0, dropout=0.0)


def test_lora_at_init_computes_the_base_model():
    model = tiny_model()
    inputs, _ = batch()
    with torch.no_grad():
        before = model(inputs)
        apply_lora(model, rank=RANK, alpha=ALPHA, dropout=0.0)
        assert torch.equal(model(inputs), before)


def test_a_training_step_changes_only_adapters():
    model = tiny_model()
    apply_lora(model, rank=RANK, alpha=ALPHA, dropout=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs, labels = batch()
    for _ in range(2):  # A's gradient is zero while B is; the second step moves it too
        opt.zero_grad()
        model(inputs, labels).backward()
        opt.step()
    for name, p in model.named_parameters():
        if name.endswith(("lora_A", "lora_B")):
            assert not torch.equal(p, before[name]), name
        else:
            assert p.grad is None and torch.equal(p, before[name]), name


def chat_batch(model_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One rendered conversation as (tokens, mask), shape (1, T + 1) each."""
    tok = add_chat_tokens(byte_tokenizer())
    assert tok.vocab_size <= model_vocab
    messages = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Teal."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Ochre."},
    ]
    ids, mask = render(messages, tok)
    return torch.tensor([ids]), torch.tensor([mask])


def gradients(model: GPT, tokens: torch.Tensor, mask: torch.Tensor):
    """Gradients of every parameter, and of the loss w.r.t. each position's final hidden state.

    The training loss never materialises the logits (chunked linear + cross-entropy), so the
    per-position signal is the gradient at the lm_head's input: d loss/d h_t = d loss/d
    logits_t @ W, zero exactly where the logits' gradient is.
    """
    model.zero_grad()
    captured = {}

    def keep_hidden(module, args):
        args[0].retain_grad()
        captured["hidden"] = args[0]

    hook = model.lm_head.register_forward_pre_hook(keep_hidden)
    inputs, labels = masked_labels(tokens, mask)
    model(inputs, labels).backward()
    hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, captured["hidden"].grad, labels


def test_masked_positions_contribute_zero_gradient():
    model = tiny_model(vocab_size=261)
    tokens, mask = chat_batch(261)
    grads, logit_grad, labels = gradients(model, tokens, mask)
    ignored = labels == IGNORE_INDEX  # (1, T)
    assert ignored.any() and (~ignored).any()
    assert torch.all(logit_grad[ignored] == 0)
    assert torch.all(logit_grad[~ignored].abs().sum(-1) > 0)

    # The last token is a target only (never an input) and is masked (EOT): changing it
    # must leave every gradient bit-identical.
    assert mask[0, -1] == 0
    changed = tokens.clone()
    changed[0, -1] = 42
    grads2, _, _ = gradients(model, changed, mask)
    assert grads2.keys() == grads.keys()
    assert all(torch.equal(grads[n], grads2[n]) for n in grads)

    # Control: the same change on an unmasked target does move the gradients.
    learned = mask.clone()
    learned[0, -1] = 1
    grads_a, _, _ = gradients(model, tokens, learned)
    grads_b, _, _ = gradients(model, changed, learned)
    assert not all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)


@pytest.mark.parametrize("tie", [False, True])
def test_merge_matches_unmerged(tie):
    model = tiny_model(tie=tie)
    base_names = list(model.state_dict())
    apply_lora(model, rank=RANK, alpha=ALPHA, dropout=0.1)
    randomize_adapters(model)
    model.eval()  # dropout off: merged and unmerged then compute the same function
    inputs, _ = batch()
    with torch.no_grad():
        unmerged = model(inputs)
    q = model.layers[0].self_attn.q_proj
    expected_q = q.weight + q.lora_B @ q.lora_A * (ALPHA / RANK)
    adapted_sd = {k: v.clone() for k, v in model.state_dict().items()}

    merged_sd = merge_state_dict(adapted_sd, ALPHA / RANK)
    assert list(merged_sd) == base_names
    assert torch.allclose(merged_sd["layers.0.self_attn.q_proj.weight"], expected_q, atol=1e-6)
    plain = tiny_model(tie=tie)
    plain.load_state_dict(merged_sd)
    with torch.no_grad():
        assert torch.allclose(plain.eval()(inputs), unmerged, atol=1e-5)
    assert (plain.lm_head.weight is plain.embed_tokens.weight) == tie
    assert "layers.0.self_attn.q_proj.lora_A" in adapted_sd  # the input is not modified


def test_merge_state_dict_needs_complete_pairs():
    sd = {"q.weight": torch.zeros(3, 2), "q.lora_A": torch.zeros(1, 2)}
    with pytest.raises(KeyError, match=r"cannot merge q.*q\.lora_B"):
        merge_state_dict(sd, 2.0)
