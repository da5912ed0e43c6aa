"""Save failures on a real filesystem with 2 real ranks: the checkpoints directory is a small
tmpfs (root only: mount), made read-only, then too small for the next tag, and a rank is
killed mid-save. Every surviving rank must exit 1 on its own within the timeout (no hang
in a collective), with one message naming the intact checkpoint and no traceback, and the
tag saved before must still verify and load.

The ranks are started as plain processes (RANK/WORLD_SIZE by hand, as torchrun would) rather
than under the `deepspeed` launcher, so each rank's own exit status is seen: the launcher
would end the others itself once one fails."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsfm.interop.weights import load_weights
from dsfm.train import checkpoint
from tests.conftest import ROOT, TINY, job_env

pytestmark = pytest.mark.distributed
INTACT = "step_00000002"
TIMEOUT_S = 120  # a tiny run takes ~10 s; a hung rank would wait for the 1 h backend timeout


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def run_dir(byte_data, tmp_path_factory):
    """A run whose checkpoints/ is a tmpfs holding one complete tag (step 2)."""
    run_dir = tmp_path_factory.mktemp("save_failures") / "run"
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True)
    try:
        mount("-t", "tmpfs", "-o", "size=64m", "tmpfs", str(ckpts))
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"needs root to mount a tmpfs: {getattr(e, 'stderr', e)}".strip())
    try:
        ranks = train_ranks(byte_data, run_dir, port=29710, stop_at=2)
        assert [r.returncode for r in ranks] == [0, 0], ranks[0].out[-3000:]
        assert checkpoint.latest_tag(ckpts) == INTACT
        yield run_dir
    finally:
        subprocess.run(["umount", str(ckpts)], check=False)


class Rank:
    def __init__(self, returncode: int, out: str):
        self.returncode, self.out = returncode, out


def train_ranks(
    data: Path, run_dir: Path, port: int, stop_at: int, fault: str | None = None
) -> list[Rank]:
    """`dsfm train` as ranks 0 and 1 of one job; each rank's exit status and output. Fails
    the test if any rank is still running after TIMEOUT_S."""
    args = [
        *TINY,
        f"data.path={data}",
        f"train.out_dir={run_dir}",
        "train.max_steps=6",
        f"train.stop_at={stop_at}",
        "eval.every=0",
        "checkpoint.every=2",
        "checkpoint.save_best=false",
    ]
    procs, logs = [], []
    for r in range(2):
        env = {
            **job_env(),
            "RANK": str(r),
            "LOCAL_RANK": str(r),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        if fault:
            env["DSFM_FAULT"] = fault
        log = open(run_dir.parent / f"rank{r}-{port}.log", "w+")
        cmd = [sys.executable, "-m", "dsfm.cli", "train", "--ds", "zero2", *args]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log))
        logs.append(log)
    deadline = time.monotonic() + TIMEOUT_S
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    hung = [r for r, p in enumerate(procs) if p.poll() is None]
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    ranks = []
    for p, log in zip(procs, logs):
        log.seek(0)
        ranks.append(Rank(p.returncode, log.read()))
        log.close()
    assert not hung, f"rank(s) {hung} still running after {TIMEOUT_S}s:\n{ranks[0].out[-3000:]}"
    return ranks


def assert_failed_cleanly(ranks: list[Rank], survivors: list[int], reason: str) -> None:
    """Each surviving rank exited 1; one message (rank 0's when the ranks agreed) naming
    `reason` and the intact tag; no traceback; nothing half-written left behind."""
    for r in survivors:
        assert ranks[r].returncode == 1, ranks[r].out[-3000:]
        assert "Traceback" not in ranks[r].out, ranks[r].out[-3000:]
    messages = [line for r in survivors for line in ranks[r].out.splitlines() if "error:" in line]
    assert len(messages) == 1, "\n".join(messages)
    assert any(r in messages[0] for r in reason.split("|")), messages[0]
    # The save's own message, or the lost-peer one when the dead rank is noticed in a
    # collective outside the save's agreement (DeepSpeed's own): both name the intact tag.
    assert (
        f"intact checkpoint is {INTACT} (a restart resumes from it)" in messages[0]
        or f"to resume from {INTACT}." in messages[0]
    ), messages[0]


def assert_intact(run_dir: Path) -> None:
    """The tag saved before verifies (manifest, client state) and its weights load; no
    step 4 tag, partial or not, was left."""
    ckpts = run_dir / "checkpoints"
    assert checkpoint.latest_tag(ckpts) == INTACT
    assert checkpoint.incomplete_reason(ckpts, INTACT) is None
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == [INTACT]
    weights = load_weights(ckpts, INTACT, checkpoint.client_state(ckpts, INTACT))
    assert weights and all(w.isfinite().all() for w in weights.values())


def test_read_only_checkpoints_dir(byte_data, run_dir):
    ckpts = run_dir / "checkpoints"
    mount("-o", "remount,ro", str(ckpts))
    try:
        ranks = train_ranks(byte_data, run_dir, port=29712, stop_at=4)
    finally:
        mount("-o", "remount,rw", str(ckpts))
    assert_failed_cleanly(ranks, [0, 1], "rank 0: [Errno 30] Read-only file system")
    assert_intact(run_dir)


def test_full_disk(byte_data, run_dir):
    """The tmpfs shrunk to the tag saved plus half a tag: writing step 4 runs out of space
    in whichever layer gets there first (DeepSpeed's shards, torch's zip writer, our JSON)."""
    ckpts = run_dir / "checkpoints"
    stat = os.statvfs(ckpts)
    used_kib = (stat.f_blocks - stat.f_bfree) * stat.f_frsize // 1024
    mount("-o", f"remount,size={used_kib * 3 // 2}k", str(ckpts))
    try:
        ranks = train_ranks(byte_data, run_dir, port=29714, stop_at=4)
    finally:
        mount("-o", "remount,size=64m", str(ckpts))
    out = ranks[0].out
    assert_failed_cleanly(ranks, [0, 1], "No space left on device" if "Errno 28" in out else "")
    assert "MiB free there" in out
    assert_intact(run_dir)


def test_rank_killed_mid_save(byte_data, run_dir):
    """Rank 1 dies (SIGKILL) after writing its shards, while rank 0 waits to agree on the
    save: rank 0 notices the lost rank, exits 1 and publishes nothing."""
    ranks = train_ranks(
        byte_data, run_dir, port=29716, stop_at=4, fault="kill_at=4:save_shards,rank=1"
    )
    assert ranks[1].returncode == -9
    assert_failed_cleanly(ranks, [0], "rank 0 lost contact with another rank|a peer rank is gone")
    assert_intact(run_dir)
