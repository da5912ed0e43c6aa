"""SwiGLU gating: silu(gate) * up, the elementwise middle of the Llama MLP.

The fallback is the model's original expression. The Triton kernel fuses the two
elementwise ops into one pass and saves nothing extra for backward: it recomputes the
sigmoid from `gate` instead of storing silu(gate), the largest activation in the block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsfm.model.ops.backend import check_impl


def swiglu(gate: torch.Tensor, up: torch.Tensor, impl: str = "torch") -> torch.Tensor:
    """silu(gate) * up for two tensors of the same shape and dtype."""
    check_impl(impl)
    if impl == "triton":
        return _SwiGLUTriton.apply(gate, up)
    return F.silu(gate) * up


class _SwiGLUTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        from dsfm.model.ops import _swiglu_triton as k

        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return k.forward(gate, up)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        from dsfm.model.ops import _swiglu_triton as k

        gate, up = ctx.saved_tensors
        return k.backward(dy.contiguous(), gate, up)
