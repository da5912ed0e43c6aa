"""Document masking on CUDA: the FlexAttention path equals the dense SDPA mask (the CPU path).

The model is in bf16, as DeepSpeed trains it. Both paths compute attention with fp32
accumulation over bf16 inputs, but in different kernels (flex's fused Triton kernel vs
SDPA's memory-efficient kernel with a boolean mask), so their bf16 outputs may differ by a
few ulps (2^-8 ~ 0.4% relative each) and the differences pass through 2 layers. Stated
tolerances: the fp32 loss within 1e-2 relative; logits within 5e-2 absolute (values of
order 1); each gradient within 5e-2 of its own norm (relative L2 error), for forward and
backward alike. A mask bug (a document seeing another) moves these by far more: the test
also checks that the plain causal window is outside the same tolerance.
"""

from __future__ import annotations

import pytest
import torch

from dsfm.data.dataset import doc_positions
from dsfm.model import gpt
from dsfm.model.config import ModelConfig
from dsfm.model.gpt import GPT

EOT = 0


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def run(fwd, model: GPT, inputs: dict[str, torch.Tensor]):
    """Loss, logits and gradients of `model`'s parameters through `fwd` (it or its compile)."""
    loss = fwd(**inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits = fwd(inputs["input_ids"], positions=inputs.get("positions"))
    return loss.detach().float(), logits.float(), grads


@pytest.mark.parametrize("compile_model", [False, True])
@pytest.mark.parametrize("seq_len", [256, 300])  # a multiple of flex's 128 block, and not
def test_flex_equals_dense_mask_forward_and_backward(monkeypatch, compile_model, seq_len):
    assert gpt.flex_attention is not None, "this torch has no FlexAttention"
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=512, n_layers=2, d_model=256, n_heads=4, n_kv_heads=2, max_seq_len=512
    )
    model = GPT(cfg).cuda().to(torch.bfloat16).train()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, 512, (4, seq_len + 1), generator=g)
    tokens[torch.rand(tokens.shape, generator=g) < 1 / 40] = EOT  # ~7 documents per row
    x = tokens[:, :-1]
    inputs = {
        "input_ids": x.cuda(),
        "labels": tokens[:, 1:].cuda(),
        "positions": doc_positions(x, EOT).cuda(),
    }
    block_masks = []  # built eagerly, outside any compiled graph, so a spy sees each
    build = gpt._flex_block_mask
    monkeypatch.setattr(gpt, "_flex_block_mask", lambda s: block_masks.append(1) or build(s))
    fwd = torch.compile(model) if compile_model else model

    flex = run(fwd, model, inputs)
    assert block_masks, "CUDA without dropout must take the FlexAttention path"
    monkeypatch.setattr(gpt, "use_flex", lambda x, dropout: False)
    block_masks.clear()
    dense = run(model, model, inputs)
    assert not block_masks

    (loss_f, logits_f, grads_f), (loss_d, logits_d, grads_d) = flex, dense
    torch.testing.assert_close(loss_f, loss_d, rtol=1e-2, atol=0)
    torch.testing.assert_close(logits_f, logits_d, rtol=0, atol=5e-2)
    for name, grad in grads_f.items():
        assert rel_err(grad, grads_d[name]) < 5e-2, name
    # The tolerance separates a right mask from a wrong one: plain causal attention over
    # the packed window is well outside it.
    _, logits_c, _ = run(model, model, {k: v for k, v in inputs.items() if k != "positions"})
    assert (logits_c - logits_d).abs().max().item() > 5e-2
