"""A built wheel, installed into a fresh venv, runs the quickstart from an empty directory:
the bundled configs and DeepSpeed recipes travel as package data, nothing reads the checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY, job_env


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The `bin/` of a fresh venv holding only the wheel; its dependencies (torch, deepspeed,
    ...) are this interpreter's, reached through a .pth line, so nothing is downloaded."""
    root = tmp_path_factory.mktemp("install")
    # Build from a copy of what a wheel is made of: setuptools' build/ in the checkout can
    # hold stale files of an earlier build, which would hide a missing one.
    src = root / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "dsfm", src / "dsfm", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    wheels = root / "wheels"
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, src], check=True
    )
    (wheel,) = wheels.glob("dsfm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in (
        "dsfm/recipes/configs/smoke.yaml",
        "dsfm/recipes/ds_configs/zero2.json",
        "dsfm/launch/pretrain.py",
    ):
        assert shipped in names, shipped

    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [*pip, "--python", python, "install", "--no-deps", "--no-index", wheel], check=True
    )
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # Appended after the venv's own site-packages; .pth files there are not run, so this
    # checkout's editable install stays invisible.
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin"


def run_in(cwd: Path, bin_dir: Path, *cmd: str) -> subprocess.CompletedProcess:
    cache = str(cwd.parent / "dsfm-cache")  # never the user's ~/.cache
    env = {**job_env(), "PATH": f"{bin_dir}:{job_env()['PATH']}", "DSFM_CACHE": cache}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_wheel_runs_the_quickstart_from_an_empty_directory(installed, tmp_path):
    where = run_in(tmp_path, installed, "python", "-c", "import dsfm; print(dsfm.__file__)")
    assert Path(where.stdout.strip()).is_relative_to(installed.parent)  # not the checkout

    listing = run_in(tmp_path, installed, "dsfm", "config", "--list").stdout
    assert "smoke" in listing and "zero2" in listing
    assert "dsfm 0.1.0" in run_in(tmp_path, installed, "dsfm", "--version").stdout

    # The quickstart's steps, smaller: prepare the embedded corpus, train with the bundled
    # config (named as the docs name it) and a bundled recipe by name, sample.
    run_in(tmp_path, installed, "dsfm", "prepare", "--input", "stdlib", "--out", "data/stdlib",
           "--tokenizer", "byte", "--max-bytes", "200000", "--val-fraction", "0.05")  # fmt: skip
    run_in(
        tmp_path,
        installed,
        "dsfm",
        "train",
        "--config",
        "configs/smoke.yaml",
        "--ds",
        "zero2",
        *TINY,
        "train.max_steps=3",
        "eval.every=3",
        "checkpoint.every=3",
    )
    assert (tmp_path / "runs/smoke/checkpoints/latest").exists()
    out = run_in(tmp_path, installed, "dsfm", "generate", "runs/smoke", "--max-new-tokens", "8")
    assert out.stdout.strip()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "runs"]  # nothing else
