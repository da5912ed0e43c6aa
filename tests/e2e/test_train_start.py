"""What `dsfm train` checks before it trains, through real `dsfm train` processes: one
writer per run directory (a second train is refused, a killed one's lock taken over), the
dataset's content against its hashes, and the notice of a changed train.seq_len on resume."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time

import numpy as np

from dsfm.observe import rundir
from dsfm.train import checkpoint
from tests.conftest import ROOT, TINY, dsfm, job_env, run_cmd


def args(data, run, *more: str) -> list[str]:
    return [*TINY, f"data.path={data}", f"train.out_dir={run}", "eval.every=0", *more]


def steps(run) -> list[int]:
    return [row["step"] for row in map(json.loads, (run / rundir.METRICS).open()) if "loss" in row]


def test_a_second_train_on_a_run_directory_is_refused_and_the_first_goes_on(byte_data, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "dsfm.cli", "train", *args(byte_data, run, "train.max_steps=8")],
        cwd=ROOT,
        env={**job_env(), "DSFM_FAULT": "step_s=0.5"},  # a window to start the second in
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not ((run / rundir.METRICS).is_file() and steps(run)):  # the first is training
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.2)

    second = dsfm("train", *args(byte_data, run, "train.max_steps=8"), check=False)
    assert second.returncode == 2, second.stderr
    assert (
        f"dsfm train: error: {run} is in use: another `dsfm train` writes to it, pid "
        f"{first.pid} on host {socket.gethostname()}"
    ) in second.stderr
    assert "Traceback" not in second.stderr and "another train.out_dir" in second.stderr

    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert steps(run) == list(range(1, 9))  # every step once: nobody else wrote here
    assert "final" in checkpoint.published_tags(rundir.checkpoints_dir(run))
    assert rundir.lock_file(run).read_text() == ""  # released on exit


def test_a_killed_train_is_taken_over_and_resumed(byte_data, tmp_path):
    """kill -9 mid-step (no cleanup runs): the kernel drops the lock, the record stays; the
    next train says so once and resumes. It also resumes with another train.seq_len: a note."""
    run = tmp_path / "run"
    common = args(byte_data, run, "train.max_steps=6", "checkpoint.every=2")
    killed = run_cmd(
        [sys.executable, "-m", "dsfm.cli", "train", *common],
        env={"DSFM_FAULT": "kill_at=3:step"},
        check=False,
    )
    assert killed.returncode == -9, killed.stderr
    dead = json.loads(rundir.lock_file(run).read_text())
    assert dead["host"] == socket.gethostname() and dead["pid"] > 0

    again = dsfm("train", *common, "train.seq_len=16")
    notes = [line for line in again.stdout.splitlines() if "stale lock" in line]
    assert len(notes) == 1 and f"pid {dead['pid']} on host {dead['host']}" in notes[0], notes
    assert "resumed from" in again.stdout and "step_00000002 at step 2" in again.stdout
    assert (
        "note: train.seq_len=16 but step_00000002 trained with 32: the samples are new windows"
    ) in again.stdout
    assert steps(run)[-1] == 6


def test_damaged_tokens_stop_train_before_it_builds_anything(byte_data, tmp_path):
    """Ids written into train.bin after prepare, the file's size unchanged."""
    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(byte_data, data)
    first = dsfm("train", *args(data, run, "train.max_steps=3"))  # a copy: hashed once
    assert "verified" in first.stdout and "against their sha256" in first.stdout

    time.sleep(0.02)  # file times tick with the kernel's clock
    with open(data / "train.bin", "r+b") as f:
        f.seek(2 * 1000)
        f.write(np.array([65535], dtype=np.uint16).tobytes())
    bad = dsfm("train", *args(data, tmp_path / "run2", "train.max_steps=3"), check=False)
    assert bad.returncode == 2, bad.stderr
    assert (
        f"{data / 'train.bin'}: token id 65535 at token offset 1000 is outside the vocabulary "
        "(257 ids)"
    ) in bad.stderr
    assert f"`dsfm data verify {data}`" in bad.stderr
    assert "IndexError" not in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "run2" / rundir.CHECKPOINTS).exists()
