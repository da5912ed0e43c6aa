"""Preemption with real ranks: a signal to one rank stops all of them at the same step with a
checkpoint and exit status 75; restarting the same run dir continues exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dsfm.train import checkpoint
from tests.conftest import ROOT, TINY, deepspeed_cmd, deepspeed_train, job_env, read_metrics

pytestmark = pytest.mark.distributed
STEPS = 30


def rank_pids(run_dir, rank: int) -> list[int]:
    out = subprocess.run(
        ["pgrep", "-f", f"local_rank={rank} .*train.out_dir={run_dir}"],
        capture_output=True,
        text=True,
    ).stdout
    return [int(p) for p in out.split()]


def wait_for_steps(proc: subprocess.Popen, run_dir) -> None:
    """Until the run has logged two rows (so a signal lands mid-run), failing if it ends."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-4000:]
        time.sleep(0.05)


def test_signal_to_one_rank_checkpoints_all_and_resume_is_exact(byte_data, tmp_path):
    common = [
        *TINY,
        f"data.path={byte_data}",
        f"train.max_steps={STEPS}",
        "eval.every=0",
        "checkpoint.every=0",
    ]
    reference = tmp_path / "reference"
    deepspeed_train("zero2", [*common, f"train.out_dir={reference}"], port=29560)

    run_dir = tmp_path / "preempted"
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "2",
        "--master_port",
        "29562",
        "launchers/pretrain.py",
        "--ds",
        "ds_configs/zero2.json",
        *common,
        f"train.out_dir={run_dir}",
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    wait_for_steps(proc, run_dir)
    for pid in rank_pids(run_dir, 1):  # rank 1 only, as if one node got the notice
        subprocess.run(["kill", "-USR1", str(pid)])
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, out[-4000:]

    rows = read_metrics(run_dir)
    stopped = [r for r in rows if r.get("event") == "preempted"]
    assert len(stopped) == 1
    step = stopped[0]["step"]
    assert 2 <= step < STEPS
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text() == f"step_{step:08d}"
    assert json.loads((ckpts / f"step_{step:08d}" / "dsfm_state.json").read_text())["step"] == step
    summary = json.loads((run_dir / "summary.json").read_text())  # written before exiting 75
    assert (summary["stop_reason"], summary["steps"]) == ("preempted", step)

    deepspeed_train("zero2", [*common, f"train.out_dir={run_dir}"], port=29564)
    resumed = [r for r in read_metrics(run_dir) if "loss" in r]
    full = [r for r in read_metrics(reference) if "loss" in r]
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))  # no step lost or repeated
    for a, b in zip(resumed, full):
        assert (a["step"], a["loss"], a["lr"]) == (b["step"], b["loss"], b["lr"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["stop_reason"], summary["steps"]) == ("max_steps", STEPS)


def test_ctrl_c_under_the_launcher_saves_the_step(byte_data, tmp_path):
    """Ctrl-C in a terminal reaches the whole foreground group: the `deepspeed` runner, its
    `launch.py` and both ranks. launch.py passes it on to the ranks as SIGTERM (and kills
    them 30 s later); that SIGTERM is the same request, so the ranks save the step they are
    on, and the next start continues from it."""
    common = [
        *TINY,
        f"data.path={byte_data}",
        f"train.max_steps={STEPS}",
        "eval.every=0",
        "checkpoint.every=0",
    ]
    run_dir = tmp_path / "interrupted"
    proc = subprocess.Popen(  # its own process group, as a shell job is
        deepspeed_cmd("zero2", [*common, f"train.out_dir={run_dir}"], port=29566),
        cwd=ROOT,
        env=job_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    wait_for_steps(proc, run_dir)
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=120)[0]  # the ranks hold the pipe until they end
    assert not rank_pids(run_dir, 0) and not rank_pids(run_dir, 1)
    assert "passing on Ctrl-C: still saving this step" in out, out[-4000:]

    stopped = [r for r in read_metrics(run_dir) if r.get("event") == "preempted"]
    assert len(stopped) == 1, out[-4000:]
    step = stopped[0]["step"]
    ckpts = run_dir / "checkpoints"
    assert checkpoint.latest_tag(ckpts) == checkpoint.step_tag(step)
    assert checkpoint.incomplete_reason(ckpts, checkpoint.step_tag(step)) is None

    deepspeed_train("zero2", [*common, f"train.out_dir={run_dir}"], port=29568)
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps == list(range(1, STEPS + 1))  # nothing lost since the Ctrl-C, nothing redone
