"""`--dry-run` of the sbatch scripts prints each task's command and environment, no Slurm needed."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import ROOT, job_env


def dry_run(script: str, *args: str, **env: str) -> str:
    proc = subprocess.run(
        ["bash", f"slurm/{script}", "--dry-run", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(job_env(), PYTHON=sys.executable, **env),
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_pretrain_dry_run_lists_every_task():
    out = dry_run(
        "pretrain.sbatch",
        "configs/d20.yaml",
        "ds_configs/zero2.json",
        "train.out_dir=/shared/runs/d20",
    )
    assert "run dir:  /shared/runs/d20" in out
    assert (
        "srun --kill-on-bad-exit=1" in out
        and "launchers/pretrain.py --config configs/d20.yaml" in out
    )
    tasks = [line for line in out.splitlines() if re.match(r"node\d+: RANK=", line)]
    assert len(tasks) == 16
    assert [int(re.search(r"RANK=(\d+)", t).group(1)) for t in tasks] == list(range(16))
    assert all("MASTER_ADDR=node01" in t and "WORLD_SIZE=16" in t for t in tasks)
    assert tasks[8].startswith("node02: RANK=8 LOCAL_RANK=0")


def test_dry_run_follows_the_requested_shape_and_offload_script():
    out = dry_run(
        "pretrain.sbatch",
        "configs/d8.yaml",
        "ds_configs/zero3.json",
        DSFM_PLAN_NODELIST="gpu[07-09]",
        DSFM_PLAN_TASKS_PER_NODE="4",
    )
    assert sum(1 for line in out.splitlines() if line.startswith("gpu")) == 12
    assert "MASTER_ADDR=gpu07" in out
    out = dry_run("offload_1gpu.sbatch", "configs/d12.yaml", "ds_configs/zero2_offload.json")
    assert [line for line in out.splitlines() if "RANK=" in line][0].startswith(
        "node01: RANK=0 LOCAL_RANK=0 WORLD_SIZE=1"
    )


def test_dry_run_refuses_a_bad_config_before_queueing():
    proc = subprocess.run(
        [
            "bash",
            "slurm/pretrain.sbatch",
            "--dry-run",
            "configs/d20.yaml",
            "ds_configs/zero2.json",
            "train.nope=1",
        ],
        cwd=ROOT,
        text=True,
        capture_output=True,
        env=dict(job_env(), PYTHON=sys.executable),
    )
    assert proc.returncode == 2 and "unknown key train.nope" in proc.stderr
