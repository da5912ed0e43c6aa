"""The collectives dsfm calls itself, in one place; each is a no-op in a one-process world.

Every rank must call each of them at the same point, or the job hangs (the watchdog,
`dsfm.train.stop`, turns such a hang into an exit naming the rank). Tensors live on the
current CUDA device when there is one (NCCL needs GPU tensors), else on the CPU (gloo).
"""

from __future__ import annotations

from typing import Any

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


def from_rank0(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (a small picklable value: a verdict, a message)."""
    if not initialized():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def first_of_ranks(obj: Any) -> Any:
    """The first rank's non-None `obj` on every rank, None when all are None (a problem one
    rank found, which must end every rank alike)."""
    if not initialized():
        return obj
    objs: list[Any] = [None] * rank_and_world()[1]
    torch_dist.all_gather_object(objs, obj)
    return next((o for o in objs if o is not None), None)


def mean_and_any(value: torch.Tensor, flag: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`value` averaged over ranks and whether `flag` is set on any rank (> 0), in one
    all-reduce and without a host read: both stay on the device (the trainer's per-step
    loss and stop request)."""
    x = torch.stack(
        [value.double(), torch.tensor(float(flag), dtype=torch.float64, device=value.device)]
    )
    all_reduce_sum(x)
    return x[0] / rank_and_world()[1], x[1] > 0
