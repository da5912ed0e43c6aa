"""`dsfm doctor` and `dsfm train`'s preflight as real processes on a machine taken apart: a
PATH with ninja but no compiler and an empty torch extensions cache."""

from __future__ import annotations

import shutil
import sys

import pytest

from tests.conftest import ROOT, job_env

NINJA = shutil.which("ninja")


@pytest.fixture
def no_compiler(tmp_path) -> dict[str, str]:
    """The test processes' environment, minus every compiler, with an empty JIT cache."""
    if NINJA is None:
        pytest.skip("ninja is not installed here")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ninja").symlink_to(NINJA)
    env = {**job_env(), "PATH": str(bin_dir), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    env.pop("CXX", None)
    return env


def run(args: list[str], env: dict[str, str]):
    import subprocess

    cmd = [sys.executable, "-m", "dsfm.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_doctor_exits_1_with_the_fix_when_offload_cannot_be_built(no_compiler):
    proc = run(["doctor", "--ds", "ds_configs/zero2_offload.json"], no_compiler)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert "no C++ compiler to build cpu_adam: `c++` (torch's default C++ compiler)" in out
    assert "fix: install g++ (Debian/Ubuntu) or gcc-c++ (RHEL/Fedora), or set CXX" in out
    assert "-> cannot run here" in out and "1 of 1 recipe(s) cannot run here" in out


def test_train_stops_before_building_with_the_fix(no_compiler, byte_data, tmp_path):
    """Without the preflight DeepSpeed's JIT build of its CPU collectives fails inside
    deepspeed.init_distributed (exit 1, a ninja traceback); with it, a config error."""
    run_dir = tmp_path / "run"
    args = ["train", "--ds", "ds_configs/zero0.json", "--config", "configs/smoke.yaml"]
    args += [f"data.path={byte_data}", f"train.out_dir={run_dir}", "train.precision=fp32"]
    proc = run(args, no_compiler)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "DeepSpeed op deepspeed_shm_comm" in proc.stderr
    assert "Fix: install g++" in proc.stderr and "Traceback" not in proc.stderr
    assert not run_dir.exists()
    assert not (tmp_path / "ext").exists()  # no build was started
