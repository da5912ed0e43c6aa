"""Fused ops for the model: one public function each, a Triton kernel and a PyTorch fallback.

Design choices:
- Each op is one function taking `impl="torch"|"triton"`; the model resolves
  `model.kernels` (auto|triton|torch) per call with `backend.resolve`, so one model object
  runs on CPU (fallback) and, once DeepSpeed moves it to a GPU, on the kernels.
- The PyTorch fallbacks of the elementwise ops (RMSNorm, SwiGLU, RoPE) are the exact
  expressions the model always used, differentiated by autograd: `kernels=torch` changes
  no numerics for existing users. The Triton paths are `torch.autograd.Function`s with
  hand-written backward kernels; they compute in fp32 and round once on store.
- Linear + cross-entropy is chunked over tokens on both paths, with a backward that
  recomputes each chunk's logits, so the (tokens x vocab) fp32 logits never exist at once.
- Triton is optional: this package imports without it, and the kernels import it lazily.
"""

from dsfm.model.ops.backend import IMPLS, resolve, triton_available
from dsfm.model.ops.linear_cross_entropy import linear_cross_entropy
from dsfm.model.ops.rmsnorm import rms_norm
from dsfm.model.ops.rope import apply_rope
from dsfm.model.ops.swiglu import swiglu

__all__ = [
    "IMPLS",
    "apply_rope",
    "linear_cross_entropy",
    "resolve",
    "rms_norm",
    "swiglu",
    "triton_available",
]
