"""The text collectives that end every rank alike, on two real gloo processes (no DeepSpeed)."""

from __future__ import annotations

import subprocess
import sys

from dsfm.distributed.env import free_port

SCRIPT = """
import os, sys
import torch.distributed as d
import torch.multiprocessing as mp

def work(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    d.init_process_group("gloo", rank=rank, world_size=2)
    from dsfm.distributed.collectives import first_of_ranks, from_rank0, gather
    got = [
        first_of_ranks("from one" if rank == 1 else None),
        first_of_ranks(f"r{rank}"),
        first_of_ranks(None),
        from_rank0("zéro says" if rank == 0 else "ignored"),
        from_rank0(None if rank == 0 else "x"),
        from_rank0(""),
        gather("rank 1: disk full ü" if rank == 1 else None),
        gather("a" * (rank + 1)),
        gather("" if rank == 0 else None),
    ]
    with open(f"{sys.argv[2]}/rank{rank}.txt", "w") as f:  # not stdout: lines interleave
        f.write(repr(got))
    d.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(work, args=(int(sys.argv[1]),), nprocs=2)
"""


def test_texts_reach_every_rank(tmp_path):
    script = tmp_path / "ranks.py"  # spawn re-imports the main module: a file, not -c
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(free_port()), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    expected = (
        "['from one', 'r0', None, 'zéro says', None, '', "
        "[None, 'rank 1: disk full ü'], ['a', 'aa'], ['', None]]"
    )
    assert proc.returncode == 0, proc.stderr
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == expected
