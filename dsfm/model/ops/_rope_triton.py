"""Triton kernel for `rope.apply_rope` (imported only when impl='triton').

The launch choices are `block_size` and `NUM_WARPS`: the launcher uses them, and
tests/unit/model/test_kernel_targets.py compiles every choice for head sizes up to
`MAX_HEAD_DIM` for sm_80, sm_89 and sm_90 and checks its registers and shared memory fit.
"""

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
    sign,
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
    # Tables hold the same angle in both halves; the first half is enough. sign=-1 rotates
    # back (the backward pass: the transpose of a rotation is its inverse). A runtime
    # argument, not a constexpr, so forward and backward share one compiled kernel.
    c = tl.load(COS + t * sct + cols, mask=mask, other=0.0)
    s = tl.load(SIN + t * sct + cols, mask=mask, other=0.0) * sign
    tl.store(yp + cols, (x1 * c - x2 * s).to(Y.dtype.element_ty), mask=mask)
    tl.store(yp + HALF + cols, (x2 * c + x1 * s).to(Y.dtype.element_ty), mask=mask)


MAX_HEAD_DIM = 8192  # head_dim <= d_model <= 8192, the widest row RMSNorm supports


def block_size(head_dim: int) -> int:
    """Columns per program: half a head (one rotation pair per column), padded to a power of 2."""
    return triton.next_power_of_2(head_dim // 2)


# Triton's default, stated so launch and test agree. Even a 8192-wide head (4096 columns,
# 32 per thread) fits in at most 184 registers without spilling.
NUM_WARPS = 4


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    B, H, T, hd = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty_like(x)  # same strides as x (dense views keep their layout)
    if x.numel():
        block = block_size(hd)
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
            -1.0 if inverse else 1.0,
            BLOCK=block,
            num_warps=NUM_WARPS,
        )
    return y
