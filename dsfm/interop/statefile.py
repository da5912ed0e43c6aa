"""A training state in one file: the `save_checkpoint`/`load_checkpoint` of your own loop.

For loops written by hand (the CS336 way), not for dsfm's trainer, whose checkpoints are
DeepSpeed tags (`dsfm.train.checkpoint`). The file is a `torch.save` of three entries:
the model's and the optimizer's state dicts and the iteration.

Design choices:
- Safe to load: `torch.load(weights_only=True)` unpickles tensors and plain containers
  only, never arbitrary objects, so a checkpoint from elsewhere cannot run code.
- A path or a file-like object (an `io.BytesIO`, an open file) on both sides. A path is
  written to a temporary file beside it and renamed, so a crash mid-save leaves the
  previous checkpoint whole.
- A `torch.compile`d model saves and loads the weights of the model it wraps, so its
  checkpoint loads into an uncompiled model and back.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import IO

import torch

KEYS = ("model", "optimizer", "iteration")


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile's wrapper


def save_checkpoint(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    iteration: int,
    out: str | os.PathLike | IO[bytes],
) -> None:
    """Write the model's and optimizer's state and `iteration` to `out` (path or file)."""
    state = {
        "model": _unwrapped(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "iteration": int(iteration),
    }
    if not isinstance(out, (str, os.PathLike)):
        torch.save(state, out)
        return
    path = Path(out)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(
    src: str | os.PathLike | IO[bytes],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> int:
    """Restore `model` (and `optimizer`, unless None) from `src`; return the saved iteration.
    Tensors land where the model's parameters are."""
    state = torch.load(src, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or any(k not in state for k in KEYS):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"{src} is not a save_checkpoint file (it needs {', '.join(KEYS)}; found {found})"
        )
    _unwrapped(model).load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return int(state["iteration"])
