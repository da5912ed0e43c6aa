"""A real one-node Slurm (Debian's slurmctld/slurmd/munge) started by the test itself.

Submits slurm/pretrain.sbatch as a 2-task CPU job, checks metrics and checkpoints, sends the
preemption signal the way Slurm's `--signal=B:USR1` would, and checks that the job saves,
requeues itself and resumes to the end without losing or repeating a step.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY, job_env, read_metrics

pytestmark = pytest.mark.slurm
SCRIPT = Path(__file__).with_name("local_slurm.sh")
STEPS = 150


def why_not() -> str | None:
    if sys.platform != "linux":
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root to install and start slurmctld/slurmd/munge"
    if shutil.which("apt-get") is None:
        return "needs apt-get (Debian) to install Slurm"
    if subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True).returncode == 0:
        return "a slurmctld is already running on this machine; not starting a second one"
    return None


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = why_not()
    if reason:
        pytest.skip(f"real Slurm test skipped: {reason}")
    env = dict(os.environ, SLURM_CI_DIR=str(tmp_path_factory.mktemp("slurm-state")))
    up = subprocess.run(
        ["bash", str(SCRIPT), "up"], env=env, capture_output=True, text=True, timeout=600
    )
    try:
        if up.returncode != 0:
            pytest.skip(f"real Slurm test skipped: could not start Slurm:\n{up.stderr[-2000:]}")
        yield subprocess.run(["sinfo", "--version"], capture_output=True, text=True).stdout
    finally:
        subprocess.run(["bash", str(SCRIPT), "down"], env=env, capture_output=True, timeout=120)


def job_state(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True)
    return dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)


def wait_for(predicate, timeout: float, what: str, job_id: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}; job: {job_state(job_id)}")
        time.sleep(0.2)


def test_sbatch_job_trains_preempts_requeues_and_resumes(slurm, byte_data, tmp_path):
    run_dir = tmp_path / "run"
    env = dict(job_env(), PYTHON=sys.executable)
    submit = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--nodes=1",
            "--ntasks-per-node=2",
            "--gpus-per-node=0",
            "--cpus-per-task=1",
            "--time=15",
            f"--output={tmp_path}/batch-%j.out",
            "slurm/pretrain.sbatch",
            "configs/smoke.yaml",
            "ds_configs/zero2.json",
            *TINY,
            f"data.path={byte_data}",
            f"train.out_dir={run_dir}",
            f"train.max_steps={STEPS}",
            "train.log_every=10",
            "eval.every=0",
            "checkpoint.every=50",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    job_id = submit.stdout.strip().split(";")[0]
    metrics = run_dir / "metrics.jsonl"

    def steps_done() -> int:
        return metrics.read_text().count('"loss"') if metrics.is_file() else 0

    wait_for(lambda: steps_done() >= 5, 240, "the first training steps", job_id)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    wait_for(
        lambda: (
            job_id
            not in subprocess.run(
                ["squeue", "-h", "-o", "%i"], capture_output=True, text=True
            ).stdout
        ),
        420,
        "the job to finish after its requeue",
        job_id,
    )

    state = job_state(job_id)
    batch_log = (tmp_path / f"batch-{job_id}.out").read_text()
    assert state.get("JobState") == "COMPLETED", (state, batch_log[-3000:])
    assert int(state["Restarts"]) == 1
    assert "requeueing job" in batch_log and "training exited with status 75" in batch_log

    rows = read_metrics(run_dir)
    events = [r for r in rows if r.get("event") == "preempted"]
    assert len(events) == 1 and 5 <= events[0]["step"] < STEPS
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))
    assert [r for r in rows if "loss" in r][-1]["tokens"] == STEPS * 4 * 2 * 2 * 32

    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text() == "final"
    logs = sorted(p.name for p in (run_dir / "logs").iterdir())
    assert logs == [f"job{job_id}-restart{r}-task{t}.log" for r in (0, 1) for t in (0, 1)]
    resumed = (run_dir / "logs" / f"job{job_id}-restart1-task0.log").read_text()
    assert f"resumed from {ckpts}/step_{events[0]['step']:08d}" in resumed
    assert "launcher=slurm rank=0/2" in resumed
