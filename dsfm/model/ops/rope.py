"""Rotary position embedding in Hugging Face's convention (rotate_half over the two halves).

The fallback is the model's original expression. The Triton kernel rotates both halves of
a head in one pass, reads the (B, H, T, hd) input through its strides (q and k arrive as
transposed views, so no copy is made) and writes the output with the same strides. Its
backward is the inverse rotation, so nothing but the tables is saved.
"""

from __future__ import annotations

import torch

from dsfm.model.ops.backend import check_impl


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, impl: str = "torch"
) -> torch.Tensor:
    """Rotate x (B, H, T, hd) by the angles in cos/sin (T, hd), whose two halves are equal."""
    check_impl(impl)
    if impl == "triton":
        return _RoPETriton.apply(x, cos, sin)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # the multiply runs in x's dtype
    return x * cos + _rotate_half(x) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class _RoPETriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        from dsfm.model.ops import _rope_triton as k

        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        ctx.save_for_backward(cos, sin)
        return k.rotate(x, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        from dsfm.model.ops import _rope_triton as k

        cos, sin = ctx.saved_tensors
        return k.rotate(dy, cos, sin, inverse=True), None, None
