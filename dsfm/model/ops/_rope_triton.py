"""Triton kernel for `rope.apply_rope` (imported only when impl='triton')."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(
    X,
    Y,
    COS,
    SIN,
    H,
    T,
    HALF,
    sxb,
    sxh,
    sxt,
    syb,
    syh,
    syt,
    sct,
    SIGN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // (H * T)
    h = (row // T) % H
    t = row % T
    cols = tl.arange(0, BLOCK)
    mask = cols < HALF
    xp = X + b * sxb + h * sxh + t * sxt
    yp = Y + b * syb + h * syh + t * syt
    x1 = tl.load(xp + cols, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xp + HALF + cols, mask=mask, other=0.0).to(tl.float32)
    # Tables hold the same angle in both halves; the first half is enough. SIGN=-1 rotates
    # back (the backward pass: the transpose of a rotation is its inverse).
    c = tl.load(COS + t * sct + cols, mask=mask, other=0.0)
    s = tl.load(SIN + t * sct + cols, mask=mask, other=0.0) * SIGN
    tl.store(yp + cols, (x1 * c - x2 * s).to(Y.dtype.element_ty), mask=mask)
    tl.store(yp + HALF + cols, (x2 * c + x1 * s).to(Y.dtype.element_ty), mask=mask)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    B, H, T, hd = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty_like(x)  # same strides as x (dense views keep their layout)
    if x.numel():
        _rotate[(B * H * T,)](
            x,
            y,
            cos,
            sin,
            H,
            T,
            hd // 2,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            y.stride(0),
            y.stride(1),
            y.stride(2),
            cos.stride(0),
            SIGN=-1.0 if inverse else 1.0,
            BLOCK=triton.next_power_of_2(hd // 2),
        )
    return y
