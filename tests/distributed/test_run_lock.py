"""Start-up refusals with real ranks: the run directory's lock (rank 0 alone takes it) and
damaged data (local rank 0 checks it) end every rank with the same message before any
engine is built, with no rank left waiting."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys

import numpy as np
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


def test_damaged_data_ends_every_rank_cleanly(byte_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(byte_data, data)
    with open(data / "train.bin", "r+b") as f:  # size unchanged
        f.seek(2 * 77)
        f.write(np.array([300], dtype=np.uint16).tobytes())
    overrides = [*TINY, f"data.path={data}", f"train.out_dir={tmp_path / 'run'}", "eval.every=0"]
    proc = deepspeed_train("zero2", overrides, port=29692, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    message = "train.bin: token id 300 at token offset 77 is outside the vocabulary (257 ids)"
    assert out.count(message) == 2, out[-3000:]
    assert "Traceback" not in out and "IndexError" not in out
