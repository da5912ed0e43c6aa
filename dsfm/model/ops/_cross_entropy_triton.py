"""Triton kernels for the softmax part of `linear_cross_entropy` (impl='triton').

One program per token streams its row of logits in vocabulary blocks: the forward keeps a
running max and sum (online log-sum-exp), the backward overwrites the row with
(softmax - onehot) * grad, so neither needs a second (n, V) buffer.

The launch choices are `block_size` and `NUM_WARPS`: the launchers use them, and
tests/unit/model/test_kernel_targets.py compiles every choice for sm_80, sm_89 and sm_90
and checks its registers and shared memory fit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 1024  # vocabulary columns per loop step, whatever the vocabulary
NUM_WARPS = 4  # Triton's default, stated so launch and test agree: 8 columns per thread


def block_size(vocab: int) -> int:
    """Columns per loop step: BLOCK_V, or the whole (power-of-2 padded) row if smaller."""
    return min(BLOCK_V, triton.next_power_of_2(vocab))


@triton.jit
def _fwd(LOGITS, LABELS, LOSS, LSE, V, stride, ignore_index, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    ptr = LOGITS + row * stride
    label = tl.load(LABELS + row)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        z = tl.load(ptr + cols, mask=cols < V, other=-float("inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    tl.store(LSE + row, lse)
    if label == ignore_index:
        tl.store(LOSS + row, 0.0)
    else:
        tl.store(LOSS + row, lse - tl.load(ptr + label))


@triton.jit
def _bwd(LOGITS, LABELS, LSE, GRAD, V, stride, ignore_index, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    ptr = LOGITS + row * stride
    label = tl.load(LABELS + row)
    lse = tl.load(LSE + row)
    g = tl.where(label == ignore_index, 0.0, tl.load(GRAD))
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        z = tl.load(ptr + cols, mask=mask, other=0.0)
        p = tl.exp(z - lse) - tl.where(cols == label, 1.0, 0.0)
        tl.store(ptr + cols, p * g, mask=mask)


def forward(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    n, v = logits.shape
    loss = torch.empty(n, device=logits.device, dtype=torch.float32)
    lse = torch.empty(n, device=logits.device, dtype=torch.float32)
    if n:
        _fwd[(n,)](
            logits,
            labels,
            loss,
            lse,
            v,
            logits.stride(0),
            ignore_index,
            BLOCK=block_size(v),
            num_warps=NUM_WARPS,
        )
    return loss, lse


def backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_total: torch.Tensor,
    ignore_index: int,
) -> torch.Tensor:
    n, v = logits.shape
    if n:
        _bwd[(n,)](
            logits,
            labels,
            lse,
            grad_total.float().contiguous(),
            v,
            logits.stride(0),
            ignore_index,
            BLOCK=block_size(v),
            num_warps=NUM_WARPS,
        )
    return logits
