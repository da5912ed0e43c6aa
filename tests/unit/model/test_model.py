"""Unit tests for dsfm.model.gpt: shapes, loss, causality, sizes, HF equivalence, KV cache."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from dsfm.model.config import ModelConfig
from dsfm.model.gpt import GPT
from dsfm.model.sizes import flops_per_token, non_embedding_params


def tiny_cfg(**overrides) -> ModelConfig:
    base = {
        "vocab_size": 128,
        "n_layers": 2,
        "d_model": 64,
        "n_heads": 4,
        "n_kv_heads": 4,
        "ffn_hidden": 96,
        "max_seq_len": 32,
        "rope_theta": 10000.0,
        "norm_eps": 1e-5,
        "tie_embeddings": False,
        "dropout": 0.0,
        "init_std": 0.02,
    }
    return ModelConfig(**{**base, **overrides})


def make_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_cfg(**overrides)).eval()


def test_output_shapes_and_loss_is_scalar():
    model = make_model()
    ids = torch.randint(0, 128, (3, 10))
    assert model(ids).shape == (3, 10, 128)
    loss = model(ids, labels=ids)
    assert loss.shape == () and torch.isfinite(loss)


def test_loss_at_init_is_near_uniform():
    model = make_model(vocab_size=512)
    ids = torch.randint(0, 512, (4, 32))
    labels = torch.randint(0, 512, (4, 32))
    assert abs(model(ids, labels=labels).item() - math.log(512)) < 0.3


def test_loss_ignores_minus_100_and_matches_manual():
    model = make_model()
    ids = torch.randint(0, 128, (2, 8))
    labels = torch.randint(0, 128, (2, 8))
    labels[:, :3] = -100
    logits = model(ids)
    expected = torch.nn.functional.cross_entropy(
        logits[:, 3:].reshape(-1, 128), labels[:, 3:].reshape(-1)
    )
    torch.testing.assert_close(model(ids, labels=labels), expected)


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_causality(n_kv_heads):
    model = make_model(n_kv_heads=n_kv_heads)
    ids = torch.randint(0, 128, (1, 16))
    changed = ids.clone()
    t = 9
    changed[0, t] = (ids[0, t] + 1) % 128
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=0)
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_gqa_param_count():
    mha, gqa = make_model(n_kv_heads=4), make_model(n_kv_heads=1)
    assert gqa(torch.randint(0, 128, (2, 8))).shape == (2, 8, 128)
    # Each layer's k_proj and v_proj shrink from d x d to d x (n_kv_heads * head_dim).
    cfg = tiny_cfg()
    saved = cfg.n_layers * 2 * cfg.d_model * (cfg.n_heads - 1) * cfg.head_dim
    assert mha.num_params() - gqa.num_params() == saved
    assert gqa.layers[0].self_attn.k_proj.weight.shape == (16, 64)


def test_tied_embeddings_share_storage_and_reduce_params():
    tied, untied = make_model(tie_embeddings=True), make_model(tie_embeddings=False)
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert tied.lm_head.weight.data_ptr() == tied.embed_tokens.weight.data_ptr()
    assert untied.num_params() - tied.num_params() == 128 * 64
    assert tied.num_params(non_embedding=True) == untied.num_params(non_embedding=True)


@pytest.mark.parametrize("tie", [False, True])
def test_num_params_matches_parameters(tie):
    model = make_model(tie_embeddings=tie, n_kv_heads=2)
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    emb = 128 * 64 * (1 if tie else 2)
    assert model.num_params(non_embedding=True) == model.num_params() - emb
    assert model.num_params(non_embedding=True) == non_embedding_params(model.cfg)


def test_flops_formula_on_known_config():
    # d4 preset: per layer 4*256^2 attention + 3*256*704 MLP + 2*256 norms; + final norm.
    cfg = ModelConfig(
        vocab_size=4096,
        n_layers=4,
        d_model=256,
        n_heads=4,
        n_kv_heads=4,
        ffn_hidden=704,
        max_seq_len=512,
    )
    n = 4 * (4 * 256 * 256 + 3 * 256 * 704 + 2 * 256) + 256
    assert n == 3_213_568
    expected = 6 * n + 12 * 4 * 256 * 512
    assert flops_per_token(cfg, 512) == expected
    torch.manual_seed(0)
    model = GPT(cfg)
    assert model.num_params(non_embedding=True) == n
    assert model.flops_per_token(512) == expected


def test_none_fields_are_derived():
    model = make_model(n_kv_heads=None, ffn_hidden=None)
    assert model.cfg.n_kv_heads == 4
    assert model.layers[0].mlp.gate_proj.weight.shape == (192, 64)  # 8/3*64 -> 192


def test_bad_config_refused():
    with pytest.raises(ValueError, match="n_kv_heads"):
        GPT(tiny_cfg(n_kv_heads=3))
    with pytest.raises(ValueError, match="vocab_size"):
        GPT(tiny_cfg(vocab_size=0))


def test_out_of_vocab_and_too_long_refused():
    model = make_model()
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 128\)"):
        model(torch.tensor([[1, 2, 128]]))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="exceeds max_seq_len=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    cache = model.new_cache(1)
    model(torch.zeros(1, 30, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="exceeds max_seq_len=32"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)


def test_init_is_deterministic_and_scaled():
    a, b = make_model(seed=3, n_layers=8), make_model(seed=3, n_layers=8)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    # Output projections get std / sqrt(2 * n_layers) = 0.005; big enough sample to see it.
    big = GPT(tiny_cfg(n_layers=8, d_model=256, n_heads=4, ffn_hidden=512))
    assert abs(big.layers[0].mlp.down_proj.weight.std().item() - 0.005) < 5e-4
    assert abs(big.layers[0].mlp.up_proj.weight.std().item() - 0.02) < 2e-3
    assert torch.all(big.norm.weight == 1)


def test_dropout_only_in_training():
    model = make_model(dropout=0.5)
    ids = torch.randint(0, 128, (2, 8))
    torch.testing.assert_close(model(ids), model(ids))
    model.train()
    assert not torch.allclose(model(ids), model(ids))


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_kv_cache_matches_full_forward(n_kv_heads):
    model = make_model(n_kv_heads=n_kv_heads)
    ids = torch.randint(0, 128, (2, 20))
    full = model(ids)
    cache = model.new_cache(2, max_len=20)
    # Prefill 7, then a 3-token chunk (exercises the offset causal mask), then 1 at a time.
    parts = [model(ids[:, :7], cache=cache), model(ids[:, 7:10], cache=cache)]
    parts += [model(ids[:, t : t + 1], cache=cache) for t in range(10, 20)]
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)


def test_cache_overflow_refused():
    model = make_model()
    cache = model.new_cache(1, max_len=4)
    with pytest.raises(ValueError, match="KV cache holds 4"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_bf16_forward_and_backward():
    model = make_model(n_kv_heads=2, tie_embeddings=True).to(torch.bfloat16).train()
    ids = torch.randint(0, 128, (2, 16))
    logits = model(ids)
    assert logits.dtype == torch.bfloat16
    loss = model(ids, labels=ids)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    cache = model.new_cache(2)
    assert cache.k[0].dtype == torch.bfloat16
    assert torch.isfinite(model(ids, cache=cache).float()).all()


# --- Hugging Face equivalence -------------------------------------------------------------


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    return {
        (k if k.startswith("lm_head.") else f"model.{k}"): v for k, v in model.state_dict().items()
    }


@pytest.mark.parametrize("n_kv_heads", [4, 2])
@pytest.mark.parametrize("tie", [False, True])
def test_matches_hf_llama(n_kv_heads, tie):
    transformers = pytest.importorskip("transformers")
    cfg = tiny_cfg(
        n_kv_heads=n_kv_heads,
        tie_embeddings=tie,
        rope_theta=500000.0,
        norm_eps=1e-6,
        max_seq_len=64,
    )
    torch.manual_seed(0)
    ours = GPT(cfg).eval()
    # Bigger weights than init so the comparison is not dominated by near-zero activations.
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.2)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        hidden_act="silu",
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=tie,
        attention_bias=False,
        mlp_bias=False,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.load_state_dict(to_hf_state_dict(ours), strict=True)
    if tie:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, cfg.vocab_size, (2, 48))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_state_dict_names_are_hf_names():
    model = make_model()
    names = set(model.state_dict())
    assert "embed_tokens.weight" in names and "lm_head.weight" in names
    assert "layers.1.self_attn.q_proj.weight" in names
    assert "layers.1.mlp.down_proj.weight" in names
    assert "layers.1.post_attention_layernorm.weight" in names
    assert not any(n.endswith(".bias") for n in names)
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())
    # No buffers: nothing a bf16 cast could silently degrade (RoPE tables are built per call).
    assert list(model.buffers()) == []
    assert dataclasses.asdict(model.cfg)["n_kv_heads"] == 4


def test_init_does_not_depend_on_build_order():
    """Each module draws from its own name-seeded generator, so modules initialised one at a
    time in any order (as a ZeRO-3 partitioned build does) equal a whole build."""
    a = make_model(seed=3)
    torch.manual_seed(3)
    b = GPT(tiny_cfg())
    with torch.no_grad():
        for p in b.parameters():
            p.zero_()
    for name, module in reversed(list(b.named_modules())):
        b.init_module(name, module)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    torch.manual_seed(4)
    other = GPT(tiny_cfg())
    assert not torch.equal(other.layers[0].mlp.up_proj.weight, a.layers[0].mlp.up_proj.weight)


def test_qwen2_family_has_zero_started_qkv_biases_counted_by_sizes():
    from dsfm.model import sizes

    model = make_model(family="qwen2")
    attn = model.layers[0].self_attn
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in (attn.q_proj, attn.k_proj))
    assert attn.v_proj.bias is not None and attn.o_proj.bias is None
    assert model.layers[0].mlp.up_proj.bias is None
    assert sizes.num_params(model.cfg) == model.num_params()
    llama = make_model()
    assert model.num_params() - llama.num_params() == model.cfg.n_layers * (
        (model.cfg.n_heads + 2 * model.cfg.n_kv_heads) * model.cfg.head_dim
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"family": "gemma"}, "model.family must be one of llama, mistral, qwen2"),
        ({"rope_scaling": "yarn"}, "model.rope_scaling must be null or one of linear, llama3"),
        ({"rope_scaling": "linear", "rope_factor": 0.5}, "model.rope_factor must be >= 1"),
        ({"rope_scaling": "llama3", "rope_low_freq_factor": 4.0}, "rope_low_freq_factor <"),
    ],
)
def test_family_and_rope_scaling_rules(overrides, message):
    assert message in "; ".join(tiny_cfg(**overrides).problems())
    with pytest.raises(ValueError, match="invalid model config"):
        GPT(tiny_cfg(**overrides))


def test_linear_rope_scaling_is_positions_divided_by_the_factor():
    from dsfm.model.gpt import rope_cos_sin

    cfg = tiny_cfg(rope_scaling="linear", rope_factor=4.0)
    pos = torch.arange(0, 32, 4)
    scaled = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, cfg)
    plain = rope_cos_sin(pos // 4, cfg.head_dim, cfg.rope_theta)
    for a, b in zip(scaled, plain):
        torch.testing.assert_close(a, b)
