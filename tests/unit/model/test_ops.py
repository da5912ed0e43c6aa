"""dsfm.model.ops: every Triton kernel equals its PyTorch fallback, forward and backward.

The kernels run in Triton's interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1
before triton is imported, so CI needs no environment setup). Shapes are small because the
interpreter executes every program in Python; they still cover non-power-of-2 widths,
a single token (T=1) and a vocabulary that is not a multiple of the kernel's block.

Tolerances per dtype:
- fp32: both paths compute in fp32 and differ only in summation order, so 1e-5
  relative/absolute (a few fp32 ulps on values of order 1, accumulated over <= 1000 terms).
- bf16: 8 significant bits, one rounding = up to 2^-8 ~ 0.4% relative. The fallback rounds
  after every torch op (2-4 roundings in a chain, more in autograd's backward), the kernel
  once on store, so they may differ by a few bf16 ulps: 2e-2 relative/absolute on values of
  order 1. The fp32 loss of a bf16 model is compared at 1e-4 (its logits are the same
  bf16 matmul on both paths; only the fp32 softmax summation order differs).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsfm.config.load import load_config
from dsfm.config.schema import ConfigError
from dsfm.model import ops
from dsfm.model.config import ModelConfig
from dsfm.model.gpt import GPT, rope_cos_sin
from dsfm.model.ops.backend import interpreting

TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}
DTYPES = [torch.float32, torch.bfloat16]

needs_triton = pytest.mark.skipif(
    not ops.triton_available() or not interpreting(),
    reason="needs triton (pip install -e '.[dev]') and, without a GPU, its interpreter "
    "(tests/conftest.py sets TRITON_INTERPRET=1); on a CUDA machine tests/gpu/ runs the kernels",
)


def _grads(fn, inputs, grad_out_seed=7):
    """fn(*inputs) and the gradients of <fn(*inputs), g> for a fixed random g."""
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_out_seed))
    grads = torch.autograd.grad(out, [t for t in inputs if t.requires_grad], g.to(out.dtype))
    return out, grads


def _assert_same(a, b, dtype):
    torch.testing.assert_close(a.float(), b.float(), **TOL[dtype])


# ---------------------------------------------------------------- elementwise ops


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, 64), (3, 7, 37), (1, 1, 100)])
def test_rms_norm_triton_matches_fallback(shape, dtype):
    torch.manual_seed(0)
    x = torch.randn(shape).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1])).to(dtype)
    results = [
        _grads(lambda x, w, i=impl: ops.rms_norm(x, w, 1e-5, i), [x, w]) for impl in ops.IMPLS
    ]
    (y0, g0), (y1, g1) = results
    assert y1.dtype == dtype and y1.shape == shape
    _assert_same(y1, y0, dtype)
    for a, b in zip(g1, g0):
        _assert_same(a, b, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, 96), (3, 7, 45), (1, 1, 1031)])
def test_swiglu_triton_matches_fallback(shape, dtype):
    torch.manual_seed(1)
    gate, up = (3 * torch.randn(shape)).to(dtype), torch.randn(shape).to(dtype)
    (y0, g0), (y1, g1) = [
        _grads(lambda g, u, i=impl: ops.swiglu(g, u, i), [gate, up]) for impl in ops.IMPLS
    ]
    _assert_same(y1, y0, dtype)
    for a, b in zip(g1, g0):
        _assert_same(a, b, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,T,hd", [(2, 3, 5, 16), (1, 2, 1, 12), (2, 1, 9, 6)])
def test_rope_triton_matches_fallback(B, H, T, hd, dtype):
    torch.manual_seed(2)
    # q arrives as a transposed view (B, T, H, hd) -> (B, H, T, hd), as in Attention
    q = torch.randn(B, T, H, hd).to(dtype).transpose(1, 2)
    cos, sin = rope_cos_sin(torch.arange(3, 3 + T), hd, 10000.0)  # not starting at 0 (cache)

    def run(impl):
        x = q.detach().clone().requires_grad_()  # keeps the transposed strides
        y = ops.apply_rope(x, cos, sin, impl)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
        return y, torch.autograd.grad(y, x, g)[0]

    (y0, dx0), (y1, dx1) = run("torch"), run("triton")
    _assert_same(y1, y0, dtype)
    _assert_same(dx1, dx0, dtype)


# ---------------------------------------------------------------- linear + cross-entropy


def _materialised_loss(x, w, labels):
    """The loss exactly as GPT.forward computed it before ops: full fp32 logits."""
    logits = F.linear(x, w).float().view(-1, w.shape[0])
    labels = labels.reshape(-1)
    total = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    return total / (labels != -100).sum().clamp(min=1)


def _lce_case(B, T, d, V, dtype, masked=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, d, generator=g).to(dtype)
    w = (0.3 * torch.randn(V, d, generator=g)).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < masked] = -100
    return x, w, labels


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B,T,d,V,chunk",
    [
        (2, 9, 16, 1000, 4),  # V not a multiple of the 1024 block; last chunk partial
        (1, 1, 24, 257, None),  # T=1, default chunking
        (3, 5, 8, 3000, 1),  # several vocab blocks per row, one token per chunk
    ],
)
def test_linear_cross_entropy_matches_materialised(impl, dtype, B, T, d, V, chunk):
    x, w, labels = _lce_case(B, T, d, V, dtype, masked=0.0 if T == 1 else 0.3)
    ref, (rx, rw) = _grads(lambda x, w: _materialised_loss(x, w, labels), [x, w])
    out, (gx, gw) = _grads(
        lambda x, w: ops.linear_cross_entropy(x, w, labels, chunk_size=chunk, impl=impl), [x, w]
    )
    assert out.dtype == torch.float32 and out.shape == ()
    loss_tol = (
        {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-4, "atol": 1e-4}
    )
    torch.testing.assert_close(out, ref, **loss_tol)
    _assert_same(gx, rx, dtype)
    _assert_same(gw, rw, dtype)
    assert gx.dtype == dtype and gw.dtype == dtype


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_linear_cross_entropy_all_masked_is_zero_not_nan(impl):
    x, w, labels = _lce_case(2, 3, 8, 50, torch.float32)
    labels[:] = -100
    out, (gx, gw) = _grads(
        lambda x, w: ops.linear_cross_entropy(x, w, labels, chunk_size=2, impl=impl), [x, w]
    )
    assert out.item() == 0.0
    assert not gx.any() and not gw.any()


def test_linear_cross_entropy_default_chunk_bounds_logits_by_hidden_size():
    # 135M-like: 8k tokens, width 768, vocab 32768 -> chunks of 192 tokens, whose logits
    # (192 x 32768) have as many elements as the hidden states (8192 x 768).
    assert ops.linear_cross_entropy.__module__.endswith("linear_cross_entropy")
    from dsfm.model.ops.linear_cross_entropy import default_chunk_size

    assert default_chunk_size(8192, 768, 32768) == 192
    assert default_chunk_size(10, 64, 128) == 5
    assert default_chunk_size(3, 768, 257) == 3  # never more than the tokens there are
    with pytest.raises(ValueError, match="chunk_size"):
        ops.linear_cross_entropy(
            torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2).long(), chunk_size=0
        )


# ---------------------------------------------------------------- the model


def _tiny(**kw) -> ModelConfig:
    base = {
        "vocab_size": 300,
        "n_layers": 2,
        "d_model": 48,
        "n_heads": 4,
        "n_kv_heads": 2,
        "ffn_hidden": 80,
        "max_seq_len": 16,
    }
    return ModelConfig(**{**base, **kw})


def _loss_and_grads(cfg: ModelConfig, ids, labels, train: bool = False):
    torch.manual_seed(0)
    model = GPT(cfg).train(train)
    loss = model(ids, labels=labels)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 300, (2, 7), generator=g)
    labels = torch.randint(0, 300, (2, 7), generator=g)
    labels[0, :2] = -100
    return ids, labels


def test_model_loss_equals_materialised_logits_loss():
    # kernels=torch keeps the numerics: the chunked loss equals the old full-logits loss.
    ids, labels = _batch()
    torch.manual_seed(0)
    model = GPT(_tiny(kernels="torch")).eval()
    torch.testing.assert_close(
        model(ids, labels=labels),
        _materialised_loss(model.norm(_hidden(model, ids)), model.lm_head.weight, labels),
    )
    assert model(ids).shape == (2, 7, 300)  # logits still come back without labels


def _hidden(model: GPT, ids):
    cos, sin = rope_cos_sin(torch.arange(ids.shape[1]), model.cfg.head_dim, model.cfg.rope_theta)
    x = model.embed_tokens(ids)
    for layer in model.layers:
        x = layer(x, cos, sin)
    return x


# Qwen2's q/k/v biases and llama3-scaled RoPE frequencies take the same kernels.
IMPORTED = {"family": "qwen2", "rope_scaling": "llama3", "rope_factor": 8.0}
IMPORTED["rope_original_max_len"] = 4


@needs_triton
@pytest.mark.parametrize("arch", [{}, IMPORTED], ids=["llama", "qwen2-llama3-rope"])
def test_model_triton_kernels_match_torch_kernels(arch):
    ids, labels = _batch()
    loss0, g0 = _loss_and_grads(_tiny(kernels="torch", **arch), ids, labels)
    loss1, g1 = _loss_and_grads(_tiny(kernels="triton", **arch), ids, labels)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-5)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-5, msg=name)


def test_activation_checkpointing_gives_the_same_loss_and_grads():
    ids, labels = _batch()
    cfg = _tiny(kernels="torch", dropout=0.1)  # dropout: the recompute must replay its RNG
    loss0, g0 = _loss_and_grads(cfg, ids, labels, train=True)
    ckpt = _tiny(kernels="torch", dropout=0.1, activation_checkpointing=True)
    loss1, g1 = _loss_and_grads(ckpt, ids, labels, train=True)
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-6, atol=1e-7, msg=name)


# ---------------------------------------------------------------- choosing kernels


def test_auto_kernels_use_the_fallback_on_cpu():
    assert ops.resolve("auto", torch.zeros(1)) == "torch"
    assert ops.resolve("torch", torch.zeros(1)) == "torch"


@needs_triton
def test_triton_on_cpu_without_the_interpreter_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*kernels=auto"):
        ops.resolve("triton", torch.zeros(1))


def test_config_rejects_unknown_kernels():
    with pytest.raises(ConfigError, match="model.kernels must be one of auto, triton, torch"):
        load_config(None, ["model.kernels=cuda"])
    cfg = load_config(
        None,
        ["model.kernels=torch", "model.activation_checkpointing=true", "train.compile=true"],
    )
    assert cfg.model.activation_checkpointing and cfg.train.compile
