"""Which implementation an op runs: `model.kernels` (auto|triton|torch) resolved per tensor.

auto = Triton when the tensor is on CUDA and triton imports, else PyTorch. `triton` is
honoured on CPU only under the Triton interpreter (TRITON_INTERPRET=1, used by the tests);
anywhere else it fails with one message instead of a crash deep inside a kernel launch.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from dsfm.model.config import KERNELS

IMPLS = ("torch", "triton")


# Looked up once, without importing triton (slow); a plain global keeps `resolve` cheap
# and traceable by torch.compile. The kernels import triton when first used.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True when triton is installed."""
    return TRITON_INSTALLED


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(kernels: str, x: torch.Tensor) -> str:
    """'triton' or 'torch' for an op on tensor `x` under the `model.kernels` setting."""
    if kernels == "torch":
        return "torch"
    if kernels == "auto":
        return "triton" if x.is_cuda and triton_available() else "torch"
    if kernels != "triton":
        raise ValueError(f"model.kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    if not triton_available():
        raise RuntimeError(
            "model.kernels=triton but triton is not importable; `pip install triton` "
            "or set model.kernels=auto"
        )
    if not x.is_cuda and not interpreting():
        raise RuntimeError(
            f"model.kernels=triton needs CUDA tensors (got {x.device}); use model.kernels=auto "
            "on CPU, or TRITON_INTERPRET=1 to run the kernels in Triton's interpreter"
        )
    return "triton"


def check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
