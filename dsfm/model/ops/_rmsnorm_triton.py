"""Triton kernels for `rmsnorm.rms_norm` (imported only when impl='triton').

The launch choices are the functions `block_size` and `num_warps`: the launchers call them,
and tests/unit/model/test_kernel_targets.py compiles every choice they make for widths up
to `MAX_D` for sm_80, sm_89 and sm_90 and checks its registers and shared memory fit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _fwd(X, W, Y, RSTD, D, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    # Round the normalised value to the input dtype before the weight multiply, as the
    # fallback (and HF Llama) do, so bf16 outputs agree to the last bit in most elements.
    n = (x * rstd).to(Y.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * D + cols, (n * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _bwd(DY, X, W, RSTD, DX, DW_PART, N, D, ROWS_PER_PROG, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    start = pid * ROWS_PER_PROG
    for i in range(0, ROWS_PER_PROG):
        row = start + i
        if row < N:
            x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * D + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            n = x * rstd
            dw += dy * n
            dn = dy * w
            # d/dx of x * rstd(x): rstd * (dn - n * mean(dn * n))
            dx = rstd * (dn - n * (tl.sum(dn * n, axis=0) / D))
            tl.store(DX + row * D + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PART + pid * D + cols, dw, mask=mask)


MAX_D = 8192  # the widest row checked for every GPU (rmsnorm.py documents d_model <= 8192)


def block_size(d: int) -> int:
    """Columns per program: the whole row, padded to a power of two."""
    return triton.next_power_of_2(d)


def num_warps(block: int) -> int:
    """Warps per program: at most 16 columns per thread, and at least Triton's default 4
    (which covers rows up to 2048, every preset's). The backward keeps several row-sized
    values per thread (x, dy, w, the weight-gradient sum): on 4 warps a 4096-wide row needs
    180 registers per thread, and an 8192-wide one runs out of the 255 and spills up to 3 KB
    per thread to local memory; at 16 columns per thread either takes at most 128."""
    return min(32, max(4, block // (32 * 16)))


def forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    n, d = x.shape
    y = torch.empty_like(x)
    rstd = torch.empty(n, device=x.device, dtype=torch.float32)
    if n:
        block = block_size(d)
        _fwd[(n,)](x, weight, y, rstd, d, eps, BLOCK=block, num_warps=num_warps(block))
    return y, rstd


def backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    n, d = x.shape
    dx = torch.empty_like(x)
    programs = max(1, min(n, 4 * _n_sms(x.device)))
    rows_per_prog = triton.cdiv(max(n, 1), programs)
    dw_part = torch.zeros(programs, d, device=x.device, dtype=torch.float32)
    if n:
        block = block_size(d)
        _bwd[(programs,)](
            dy,
            x,
            weight,
            rstd,
            dx,
            dw_part,
            n,
            d,
            rows_per_prog,
            BLOCK=block,
            num_warps=num_warps(block),
        )
    return dx, dw_part.sum(0).to(weight.dtype)


def _n_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: few programs, each looping over many rows
