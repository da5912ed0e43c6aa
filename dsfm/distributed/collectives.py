"""The collectives dsfm calls itself, in one place; each is a no-op in a one-process world.

Every rank must call each of them at the same point, or the job hangs (the watchdog,
`dsfm.train.stop`, turns such a hang into an exit naming the rank). Tensors live on the
current CUDA device when there is one (NCCL needs GPU tensors), else on the CPU (gloo).
"""

from __future__ import annotations

import re

import torch
import torch.distributed as torch_dist


def initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the process group; (0, 1) without one."""
    return (torch_dist.get_rank(), torch_dist.get_world_size()) if initialized() else (0, 1)


def barrier() -> None:
    if initialized():
        torch_dist.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """`x` summed over ranks, in place."""
    if initialized():
        torch_dist.all_reduce(x)
    return x


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (one tiny all-reduce)."""
    device = (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    )
    x = torch.tensor([float(flag)], device=device)
    return all_reduce_sum(x).item() > 0


def mean_and_any(value: torch.Tensor, flag: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`value` averaged over ranks and whether `flag` is set on any rank (> 0), in one
    all-reduce and without a host read: both stay on the device (the trainer's per-step
    loss and stop request)."""
    x = torch.stack(
        [value.double(), torch.tensor(float(flag), dtype=torch.float64, device=value.device)]
    )
    all_reduce_sum(x)
    return x[0] / rank_and_world()[1], x[1] > 0


def lost_peer(error: BaseException) -> str | None:
    """The cause in one line when `error` is a collective failing because another rank is
    gone (killed, its node down), else None. NCCL raises `DistError`s; gloo a plain
    `RuntimeError` from its TCP transport ("Connection reset by peer", "Connection closed by
    peer", a timed-out recv), whose text we cut to the part that names the peer."""
    text = str(error)
    if not initialized() or not (
        isinstance(error, torch_dist.DistError)
        or (isinstance(error, RuntimeError) and "gloo/transport" in text)
    ):
        return None
    text = re.sub(r"^\[[^\]]*\] ", "", text.strip().splitlines()[0])  # [.../pair.cc:537]
    return text.split(". This is typically")[0]
