"""Ctrl-C on a real `dsfm train` (one process, as in a terminal): the first SIGINT finishes the
step, saves it and exits 75; a second one exits at once without saving; the next start
resumes from the saved step."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from dsfm.train import checkpoint
from tests.conftest import ROOT, TINY, job_env, read_metrics

STEPS = 12


def interrupt(args: list[str], run_dir, after_step: int, times: int) -> subprocess.Popen:
    """Start `dsfm train`, wait for a step past `after_step`, send SIGINT `times` times.
    Each step takes >= 0.3 s (DSFM_FAULT step_s), so the signals land mid-run."""
    env = {**job_env(), "DSFM_FAULT": "step_s=0.3"}
    cmd = [sys.executable, "-m", "dsfm.cli", "train", *args]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 120
    while not (
        metrics.is_file() and any(r.get("step", 0) > after_step for r in read_metrics(run_dir))
    ):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    for _ in range(times):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
    proc.out = proc.communicate(timeout=120)[0]
    return proc


def test_ctrl_c_saves_and_exits_75_twice_exits_at_once(byte_data, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        *TINY,
        f"data.path={byte_data}",
        f"train.out_dir={run_dir}",
        f"train.max_steps={STEPS}",
        "eval.every=0",
        "checkpoint.every=0",
        "checkpoint.save_best=false",
    ]
    ckpts = run_dir / "checkpoints"

    first = interrupt(args, run_dir, after_step=1, times=1)
    assert first.returncode == 75, first.out[-3000:]
    assert "received SIGINT: stopping after this step" in first.out
    assert "Traceback" not in first.out and "KeyboardInterrupt" not in first.out
    stopped = [r["step"] for r in read_metrics(run_dir) if r.get("event") == "preempted"]
    assert len(stopped) == 1 and 2 <= stopped[0] < STEPS
    step = stopped[0]
    tag = checkpoint.step_tag(step)
    assert checkpoint.latest_tag(ckpts) == tag and checkpoint.incomplete_reason(ckpts, tag) is None
    assert checkpoint.client_state(ckpts, tag)["step"] == step

    second = interrupt(args, run_dir, after_step=step, times=2)
    assert second.returncode == 143, second.out[-3000:]  # at once: no checkpoint
    assert checkpoint.latest_tag(ckpts) == tag
    assert [t for _, t in checkpoint.step_tags(ckpts)] == [tag]

    rows_before = len(read_metrics(run_dir))
    done = subprocess.run(
        [sys.executable, "-m", "dsfm.cli", "train", *args],
        cwd=ROOT,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resumed from {ckpts / tag} at step {step}" in done.stdout
    steps = [r["step"] for r in read_metrics(run_dir)[rows_before:] if "loss" in r]
    assert steps == list(range(step + 1, STEPS + 1))
