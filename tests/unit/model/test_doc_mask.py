"""Document masking (`positions=`): a packed window computes what its documents compute alone.

Tolerances: everything runs in fp32 on CPU. The packed forward and the per-document ones
run the same matmuls on different shapes, so only summation order differs: 1e-5
relative/absolute on logits, losses and gradients of order 1 (a few fp32 ulps).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the RoPE kernel runs in the interpreter

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dsfm.data.dataset import doc_positions  # noqa: E402
from dsfm.model import gpt, ops  # noqa: E402
from dsfm.model.config import ModelConfig  # noqa: E402
from dsfm.model.gpt import GPT, IGNORE_INDEX, apply_rope, rope_cos_sin  # noqa: E402

EOT = 0
TOL = {"rtol": 1e-5, "atol": 1e-5}


def make_model(**overrides) -> GPT:
    torch.manual_seed(0)
    cfg = {
        "vocab_size": 96,
        "n_layers": 2,
        "d_model": 64,
        "n_heads": 4,
        "n_kv_heads": 2,  # GQA
        "ffn_hidden": 96,
        "max_seq_len": 64,
        "kernels": "torch",
        **overrides,
    }
    return GPT(ModelConfig(**cfg))


# (row, start, end) of the documents of `packed_batch`: each ends with its EOT
DOCUMENTS = [(0, 0, 7), (0, 7, 8), (0, 8, 20), (0, 20, 34), (0, 34, 40)]
DOCUMENTS += [(1, 0, 1), (1, 1, 16), (1, 16, 40)]


def packed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two windows of 40 inputs: row 0 starts mid-document and holds four documents (one
    of a single token), row 1 starts on a fresh document and ends on an EOT. Chat-style
    labels: -100 on prompts, and one document with no target at all."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, 96, (2, 41), generator=g)
    tokens[0, [6, 7, 19, 33]] = EOT
    tokens[1, [0, 15, 39]] = EOT  # its last input is an EOT
    x, y = tokens[:, :-1], tokens[:, 1:].clone()
    y[0, 8:14] = IGNORE_INDEX  # a prompt
    y[0, 20:34] = IGNORE_INDEX  # a document without targets: counts nowhere
    y[1, 16:25] = IGNORE_INDEX
    return x, y


def documents(positions: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, end) of every document, from where positions restart."""
    out = []
    for b, row in enumerate(positions):
        starts = [*torch.nonzero(row == 0).flatten().tolist(), len(row)]
        out += [(b, s, e) for s, e in zip(starts, starts[1:])]
    return out


def grads(model: GPT) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def test_packed_window_equals_its_documents_run_alone():
    model = make_model().train()  # no dropout: train mode only switches checkpointing paths
    x, y = packed_batch()
    positions = doc_positions(x, EOT)
    assert documents(positions) == DOCUMENTS

    packed = model(x, labels=y, positions=positions)
    packed.backward()
    packed_grads = grads(model)
    with torch.no_grad():
        packed_logits = model(x, positions=positions)

    # Each document alone: the token-weighted mean of their losses, and of their gradients.
    nats, n_tokens, logits_alone = 0.0, 0, torch.empty_like(packed_logits)
    for b, s, e in documents(positions):
        xd, yd = x[b : b + 1, s:e], y[b : b + 1, s:e]
        n = int((yd != IGNORE_INDEX).sum())
        with torch.no_grad():
            logits_alone[b, s:e] = model(xd)[0]
        if n == 0:
            continue
        loss = model(xd, labels=yd)
        (loss * n).backward()  # gradients accumulate as summed nats
        nats, n_tokens = nats + loss.item() * n, n_tokens + n
    alone_grads = {k: g / n_tokens for k, g in grads(model).items()}

    assert n_tokens == int((y != IGNORE_INDEX).sum())
    torch.testing.assert_close(packed.item(), nats / n_tokens, **TOL)
    torch.testing.assert_close(packed_logits, logits_alone, **TOL)
    for name, g in packed_grads.items():
        torch.testing.assert_close(g, alone_grads[name], **TOL, msg=name)
    # ...while the plain causal window differs: the documents do see each other there.
    with torch.no_grad():
        assert not torch.allclose(model(x, labels=y), packed, **TOL)


def test_without_positions_the_plain_causal_path_runs(monkeypatch):
    """doc_mask off: SDPA with is_causal and no mask, as before; one document spanning the
    window gives the same numbers through the masked path."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs["attn_mask"], kwargs["is_causal"]))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = make_model().train()
    x = torch.randint(1, 96, (2, 24))  # no EOT: one document per row
    causal = model(x, labels=x)
    assert calls == [(None, True)] * 2  # one per layer
    causal.backward()
    causal_grads = grads(model)

    calls.clear()
    masked = model(x, labels=x, positions=doc_positions(x, EOT))
    assert [(m.shape, c) for m, c in calls] == [((2, 1, 24, 24), False)] * 2
    masked.backward()
    torch.testing.assert_close(masked, causal, **TOL)
    for name, g in grads(model).items():
        torch.testing.assert_close(g, causal_grads[name], **TOL, msg=name)


def test_activation_checkpointing_recomputes_the_same_masked_block():
    x, y = packed_batch()
    positions = doc_positions(x, EOT)
    results = []
    for recompute in (False, True):
        model = make_model(activation_checkpointing=recompute).train()
        loss = model(x, labels=y, positions=positions)
        loss.backward()
        results.append((loss, grads(model)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    for name, g in grads_b.items():
        torch.testing.assert_close(g, grads_a[name], rtol=0, atol=0, msg=name)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_block_mask_matches_the_dense_mask(monkeypatch):
    """The FlexAttention path's mask, run by eager flex_attention on CPU (forward only:
    flex has no CPU backward); tests/gpu/ checks the compiled kernel on CUDA."""
    if gpt.flex_attention is None:
        pytest.skip("this torch has no FlexAttention")
    model = make_model().eval()
    x, _ = packed_batch()
    positions = doc_positions(x, EOT)
    with torch.no_grad():
        dense = model(x, positions=positions)
        monkeypatch.setattr(gpt, "use_flex", lambda x, dropout: True)
        assert isinstance(gpt.doc_attention_mask(positions, flex=True), gpt.BlockMask)
        flex = model(x, positions=positions)
    torch.testing.assert_close(flex, dense, **TOL)


@pytest.mark.parametrize(
    "kernels",
    [
        "torch",
        pytest.param(
            "triton",
            marks=pytest.mark.skipif(not ops.triton_available(), reason="needs triton"),
        ),
    ],
)
def test_per_sample_rope_equals_each_sample_alone(kernels):
    """(B, T, hd) tables fold the batch into time for the op: the same rotation as giving
    each sample its own (T, hd) table, forward and backward (Triton: the interpreter)."""
    B, H, T, hd = 2, 2, 5, 16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, H, hd, generator=g).transpose(1, 2).requires_grad_()  # as q, k are
    positions = torch.tensor([[3, 4, 0, 1, 2], [0, 1, 2, 3, 4]])
    cos, sin = rope_cos_sin(positions, hd, 10000.0)  # (B, T, hd)
    y = apply_rope(x, cos, sin, kernels)
    (gy,) = torch.autograd.grad(y, x, torch.ones_like(y))
    for b in range(B):
        cb, sb = rope_cos_sin(positions[b], hd, 10000.0)  # (T, hd)
        xb = x[b : b + 1].detach().requires_grad_()
        yb = apply_rope(xb, cb, sb, kernels)
        (gb,) = torch.autograd.grad(yb, xb, torch.ones_like(yb))
        torch.testing.assert_close(y[b : b + 1], yb, **TOL)
        torch.testing.assert_close(gy[b : b + 1], gb, **TOL)


def test_positions_refused_with_a_cache_or_another_shape():
    model = make_model().eval()
    x = torch.randint(1, 96, (1, 8))
    with pytest.raises(ValueError, match="KV cache"):
        model(x, cache=model.new_cache(1), positions=doc_positions(x, EOT))
    with pytest.raises(ValueError, match="must match input_ids"):
        model(x, positions=torch.zeros(1, 7, dtype=torch.long))
