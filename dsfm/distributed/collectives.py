"""The collectives dsfm calls itself, in one place; each is a no-op in a one-process world.

Every rank must call each of them at the same point, or the job hangs (the watchdog,
`dsfm.train.stop`, turns such a hang into an exit naming the rank). Tensors live on the
current CUDA device when there is one (NCCL needs GPU tensors), else on the CPU (gloo).
"""

from __future__ import annotations

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


def gather(obj: object) -> list[object]:
    """Every rank's `obj` (small, picklable), in rank order, on every rank."""
    if not initialized():
        return [obj]
    out: list[object] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def mean_and_any(value: torch.Tensor, flag: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`value` averaged over ranks and whether `flag` is set on any rank (> 0), in one
    all-reduce and without a host read: both stay on the device (the trainer's per-step
    loss and stop request)."""
    x = torch.stack(
        [value.double(), torch.tensor(float(flag), dtype=torch.float64, device=value.device)]
    )
    all_reduce_sum(x)
    return x[0] / rank_and_world()[1], x[1] > 0
