"""`lost_peer` on the error a real gloo collective raises when the other rank is killed: two
real processes on this host (no DeepSpeed), one of them SIGKILLed between two all-reduces."""

from __future__ import annotations

import subprocess
import sys

import torch

from dsfm.distributed import collectives
from dsfm.distributed.env import free_port
from tests.conftest import ROOT, job_env

RANK = """
import os, sys, time, datetime, torch, torch.distributed as dist
from dsfm.distributed.collectives import lost_peer
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=rank,
                        world_size=2, timeout=datetime.timedelta(seconds=30))
dist.all_reduce(torch.ones(1))
if rank == 1:
    os.kill(os.getpid(), 9)
time.sleep(0.5)
try:
    dist.all_reduce(torch.ones(1))
except Exception as e:
    print("lost_peer:", lost_peer(e))
    print("other error:", lost_peer(RuntimeError("shape mismatch")))
"""


def test_a_killed_peer_is_recognised_and_named(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    port = str(free_port())
    env = {**job_env(), "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), port],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    out = procs[0].communicate(timeout=60)[0]
    assert procs[1].wait(timeout=60) == -9
    found = [line for line in out.splitlines() if line.startswith("lost_peer:")]
    assert found, out
    print(found[0])
    # one line naming the peer's address, without gloo's source path or its advice
    assert "127.0.0.1" in found[0] and "peer" in found[0], out
    assert "pair.cc" not in found[0] and "GLHF" not in found[0], out
    assert "other error: None" in out


def test_errors_outside_a_process_group_are_not_lost_peers():
    assert not collectives.initialized()
    gloo = RuntimeError("[x/gloo/transport/tcp/pair.cc:1] Read error [10.0.0.2]:1: Connection")
    assert collectives.lost_peer(gloo) is None  # no group: not a collective's failure
    assert collectives.lost_peer(torch.distributed.DistError("x")) is None
