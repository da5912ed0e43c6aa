"""Where this process sits: rank, local rank and world size from the launcher's environment.

The DeepSpeed launcher and torchrun both export RANK/LOCAL_RANK/WORLD_SIZE; a plain
`dsfm train` has none, and we fill a single-process world so the same code path runs.
Rank 0 speaks (`print0`); every rank still joins collectives. Initialising the
communication backend is `engine.init_distributed`, the one module that imports deepspeed.
"""

from __future__ import annotations

import os
import socket
from typing import Any


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def is_rank0() -> bool:
    return rank() == 0


def print0(*args: Any, **kwargs: Any) -> None:
    if is_rank0():
        print(*args, **kwargs, flush=True)


def ensure_env() -> None:
    """Make a lone process look like a one-rank launch; refuse half-set environments."""
    present = [k for k in ("RANK", "WORLD_SIZE") if k in os.environ]
    if len(present) == 1:
        missing = {"RANK", "WORLD_SIZE"} - set(present)
        raise RuntimeError(
            f"{present[0]} is set but {missing.pop()} is not: launch with "
            "`deepspeed`, `torchrun`, or neither (single process)"
        )
    if not present:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
