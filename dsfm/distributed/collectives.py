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


def gather(text: str | None) -> list[str | None]:
    """Every rank's `text` (a short outcome; None for none), in rank order, on every rank."""
    if not initialized():
        return [text]
    data, size = _encoded(text)
    sizes = [torch.zeros_like(size) for _ in range(rank_and_world()[1])]
    torch_dist.all_gather(sizes, size)
    buf = _bytes(data, max(int(n.item()) for n in sizes))
    bufs = [torch.zeros_like(buf) for _ in sizes]
    torch_dist.all_gather(bufs, buf)
    return [_decoded(b, n) for n, b in zip(sizes, bufs, strict=True)]


def from_rank0(text: str | None) -> str | None:
    """Rank 0's `text` (a verdict, a message; None for none) on every rank."""
    return _text_from(0, text)


def first_of_ranks(text: str | None) -> str | None:
    """The first rank's non-None `text` on every rank, None when all are None (a problem one
    rank found, which must end every rank alike)."""
    if not initialized():
        return text
    rank, world = rank_and_world()
    found = torch.zeros(world, device=_device())
    found[rank] = float(text is not None)
    all_reduce_sum(found)
    senders = found.nonzero()
    return None if len(senders) == 0 else _text_from(int(senders[0, 0]), text)


def _text_from(src: int, text: str | None) -> str | None:
    """`src`'s text on every rank."""
    if not initialized():
        return text
    data, size = _encoded(text)
    torch_dist.broadcast(size, src=src)
    if int(size.item()) == 0:  # None: every rank knows it now, no second collective
        return None
    buf = _bytes(data if rank_and_world()[0] == src else b"", int(size.item()))
    torch_dist.broadcast(buf, src=src)
    return _decoded(buf, size)


# Texts travel as plain uint8 tensors behind a size (0 for None, else bytes + 1), not through
# torch's object collectives, which pickle and warn of a deprecated call on every rank.
def _encoded(text: str | None) -> tuple[bytes, torch.Tensor]:
    data = b"" if text is None else text.encode()
    return data, torch.tensor([0 if text is None else len(data) + 1], device=_device())


def _bytes(data: bytes, size: int) -> torch.Tensor:
    """A buffer for a text of encoded `size` (at least one byte), holding `data`."""
    buf = torch.zeros(max(size - 1, 1), dtype=torch.uint8, device=_device())
    if data:
        buf[: len(data)].copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    return buf


def _decoded(buf: torch.Tensor, size: torch.Tensor) -> str | None:
    n = int(size.item())
    return None if n == 0 else buf.cpu().numpy()[: n - 1].tobytes().decode()


def _device() -> torch.device | None:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None


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
