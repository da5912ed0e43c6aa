"""RMSNorm: y = weight * (x / sqrt(mean(x^2) + eps)), normalised in fp32 as HF Llama does.

The fallback is the model's original expression. The Triton kernel keeps one row per
program in registers (the width fits: d_model <= 8192), saves only the per-row 1/rms for
backward, and reduces the weight gradient through one partial sum per program instead of
a (rows x width) buffer.
"""

from __future__ import annotations

import torch

from dsfm.model.ops.backend import check_impl


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, impl: str = "torch"
) -> torch.Tensor:
    """RMSNorm over the last dim of x (..., D) with weight (D,); output in x's dtype."""
    check_impl(impl)
    if impl == "triton":
        return _RMSNormTriton.apply(x, weight, eps)
    # Mean of squares in fp32: in bf16 it loses enough precision to shift the output.
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


class _RMSNormTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        from dsfm.model.ops import _rmsnorm_triton as k

        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()  # (N, D)
        y, rstd = k.forward(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        from dsfm.model.ops import _rmsnorm_triton as k

        x2, weight, rstd = ctx.saved_tensors
        dx, dw = k.backward(dy.reshape(x2.shape).contiguous(), x2, weight, rstd)
        return dx.view(dy.shape), dw, None
