"""The run directory's lock with real ranks: rank 0 alone takes it, and its refusal ends
every rank with the same message before any engine is built (no rank left waiting)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from dsfm.observe import rundir
from tests.conftest import TINY, deepspeed_train

pytestmark = pytest.mark.distributed

HOLD = (
    "from dsfm.train import runlock; import sys, time; runlock.acquire(sys.argv[1]); "
    "print('held', flush=True); time.sleep(600)"
)


def test_a_held_run_directory_ends_every_rank_cleanly(byte_data, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        overrides = [*TINY, f"data.path={byte_data}", f"train.out_dir={run}", "eval.every=0"]
        proc = deepspeed_train("zero2", overrides, port=29690, check=False)
    finally:
        holder.kill()
        holder.wait()
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    message = f"is in use: another `dsfm train` writes to it, pid {holder.pid} on host "
    assert out.count(message) == 2, out[-3000:]  # both ranks, the same words
    assert socket.gethostname() in out and "Traceback" not in out
    assert not rundir.checkpoints_dir(run).exists()
