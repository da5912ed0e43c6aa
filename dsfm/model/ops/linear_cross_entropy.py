"""LM head + cross-entropy without materialising the (tokens x vocab) fp32 logits.

Design choices:
- Tokens are processed in chunks: logits for one chunk are computed (in the weight's
  dtype, then fp32 for the softmax, exactly as `GPT.forward` did on the full tensor), the
  chunk's loss sum and per-token log-sum-exp are kept, and the logits are dropped. Backward
  recomputes each chunk's logits from the saved hidden states and turns them into
  d(loss)/d(logits) in place, so peak extra memory is one chunk, not the whole batch.
- The default chunk holds about as many logits as the hidden states have elements
  (tokens * d_model / vocab tokens per chunk), so the extra memory never exceeds an
  activation the model already keeps.
- Only the per-chunk softmax math differs between impls: torch ops, or one Triton kernel
  that streams the vocabulary in blocks (online log-sum-exp) and one that writes the
  gradient over the logits buffer. Matmuls stay in torch (cuBLAS) on both paths.
- Labels equal to `ignore_index` contribute nothing; the result is sum / count with count
  clamped at 1, so an all-masked batch gives 0, not NaN (the model's convention).
- The weight gradient is accumulated over chunks in fp32 and cast once at the end.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dsfm.model.ops.backend import check_impl

IGNORE_INDEX = -100


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
    impl: str = "torch",
) -> torch.Tensor:
    """Mean cross-entropy of `x @ weight.T` against `labels` over the non-ignored tokens.

    x: (..., d) hidden states; weight: (V, d); labels: (...) int64 with the shape of x[..., 0].
    chunk_size: tokens per chunk (None = about tokens * d / V, see the module docstring).
    """
    check_impl(impl)
    d = x.shape[-1]
    x2 = x.reshape(-1, d)  # (N, d)
    labels = labels.reshape(-1)
    if labels.numel() != x2.shape[0]:
        raise ValueError(f"labels hold {labels.numel()} tokens but x holds {x2.shape[0]}")
    if chunk_size is None:
        chunk_size = default_chunk_size(x2.shape[0], d, weight.shape[0])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    total = _LinearCrossEntropy.apply(x2, weight, labels, ignore_index, chunk_size, impl)
    return total / (labels != ignore_index).sum().clamp(min=1)


def default_chunk_size(n_tokens: int, d_model: int, vocab_size: int) -> int:
    """Tokens per chunk so one chunk's logits have about as many elements as x."""
    return max(1, min(n_tokens, math.ceil(n_tokens * d_model / vocab_size)))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, labels, ignore_index, chunk_size, impl):
        n = x.shape[0]
        total = torch.zeros((), device=x.device, dtype=torch.float32)
        lse = torch.empty(n, device=x.device, dtype=torch.float32)
        for s in range(0, n, chunk_size):
            e = min(n, s + chunk_size)
            logits = F.linear(x[s:e], weight).float()  # (chunk, V)
            loss_sum, lse[s:e] = _ce_forward(logits, labels[s:e], ignore_index, impl)
            total += loss_sum
        ctx.save_for_backward(x, weight, labels, lse)
        ctx.ignore_index, ctx.chunk_size, ctx.impl = ignore_index, chunk_size, impl
        return total

    @staticmethod
    def backward(ctx, grad_total):
        x, weight, labels, lse = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = None
        if need_w:
            grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
        n = x.shape[0]
        for s in range(0, n, ctx.chunk_size):
            e = min(n, s + ctx.chunk_size)
            logits = F.linear(x[s:e], weight).float()  # recomputed (chunk, V)
            dlogits = _ce_backward(
                logits, labels[s:e], lse[s:e], grad_total, ctx.ignore_index, ctx.impl
            ).to(weight.dtype)
            if need_x:
                grad_x[s:e] = dlogits @ weight
            if need_w:
                grad_w += dlogits.t() @ x[s:e]
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_x, grad_w, None, None, None, None


def _ce_forward(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, impl: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the chunk's token losses, per-token log-sum-exp) for fp32 logits (n, V)."""
    if impl == "triton":
        from dsfm.model.ops import _cross_entropy_triton as k

        loss, lse = k.forward(logits, labels, ignore_index)
        return loss.sum(), lse
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return loss, torch.logsumexp(logits, dim=-1)


def _ce_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_total: torch.Tensor,
    ignore_index: int,
    impl: str,
) -> torch.Tensor:
    """d(sum of losses)/d(logits) * grad_total, written over `logits` (fp32, (n, V))."""
    if impl == "triton":
        from dsfm.model.ops import _cross_entropy_triton as k

        return k.backward(logits, labels, lse, grad_total, ignore_index)
    keep = labels != ignore_index  # (n,)
    logits.sub_(lse[:, None]).exp_()  # softmax
    rows = torch.arange(len(labels), device=labels.device)
    logits[rows, labels.clamp(min=0)] -= keep.float()
    logits.mul_((grad_total * keep.float())[:, None])
    return logits
