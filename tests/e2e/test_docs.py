"""Every shell command in docs/*.md runs: the guides cannot rot.

Each ```bash block of a guide runs in order, in one scratch project directory per guide
(configs/, ds_configs/, launchers/ and slurm/ linked in), under `bash -euo pipefail`, with
the installed `dsfm` and `deepspeed` on PATH. Blocks tagged ```bash ci=tiny are sized for
GPUs or a cluster; they run here with the substitutions in `tiny()`: two CPU ranks instead
of `--num_gpus N`, a tiny model and a few steps, and `sbatch` replaced by the script's own
`--dry-run`. docs/README.md states the same rules for readers.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, job_env

DOCS = sorted((ROOT / "docs").glob("*.md"))
NOT_GUIDES = ("README.md", "architecture.md")  # the index and the design: no commands to run
FENCE = re.compile(r"^```bash(?P<tags>[^\n]*)\n(?P<body>.*?)^```", re.M | re.S)

# What a tiny block's training commands get appended: the smallest model that still has every
# part, fp32 (the numbers the CPU tests compare exactly), a handful of steps.
TINY_OVERRIDES = [
    "model.d_model=64",
    "model.n_heads=4",
    "model.n_layers=2",
    "model.max_seq_len=64",
    "train.seq_len=32",
    "train.micro_batch_size=2",
    "train.grad_accum=1",
    "train.max_steps=4",
    "train.precision=fp32",
    "schedule.warmup_steps=1",
    "eval.every=2",
    "eval.batches=1",
    "eval.max_new_tokens=4",
    "checkpoint.every=2",
]


def blocks(doc: Path) -> list[tuple[bool, str]]:
    """(is_tiny, shell text) of every ```bash block, in order."""
    return [("ci=tiny" in m["tags"], m["body"]) for m in FENCE.finditer(doc.read_text())]


def commands(text: str) -> list[str]:
    """Shell lines with backslash continuations joined; blank and comment lines kept as is."""
    return text.replace("\\\n", " ").splitlines()


def tiny(line: str) -> str:
    """A cluster-sized command as CI runs it (see the module docstring)."""
    words = shlex.split(line, comments=True)
    if not words:
        return line
    if words[0] == "sbatch":
        script = next(i for i, w in enumerate(words) if w.endswith(".sbatch"))
        return shlex.join(["bash", words[script], "--dry-run", *words[script + 1 :]])
    trains = any(w.startswith("launchers/") for w in words) or words[:2] in (
        ["dsfm", "train"],
        ["dsfm", "finetune"],
    )
    if not trains:
        return line
    if words[0] == "deepspeed":
        launcher = next(i for i, w in enumerate(words) if w.startswith("launchers/"))
        words = ["deepspeed", "--num_gpus", "2", *words[launcher:]]
    return shlex.join([*words, *TINY_OVERRIDES])


def scratch_project(tmp: Path) -> dict[str, str]:
    for name in ("configs", "ds_configs", "launchers", "slurm"):
        (tmp / name).symlink_to(ROOT / name)
    bin_dir = str(Path(sys.executable).parent)
    return dict(
        job_env(),
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        PYTHON=sys.executable,
        PYTHONPATH=str(ROOT),
        WANDB_MODE="offline",
        WANDB_SILENT="true",
    )


def test_docs_exist_and_have_commands():
    names = {d.name for d in DOCS}
    assert {"training.md", "deepspeed.md", "slurm.md"} <= names, names
    for doc in DOCS:
        if doc.name not in NOT_GUIDES:
            assert blocks(doc), f"{doc.name} has no ```bash block to check"


def test_tiny_rewrites_cluster_commands():
    assert tiny("sbatch --nodes=4 slurm/pretrain.sbatch configs/d20.yaml ds.json a.b=1") == (
        "bash slurm/pretrain.sbatch --dry-run configs/d20.yaml ds.json a.b=1"
    )
    line = tiny("deepspeed --num_gpus 8 launchers/pretrain.py --ds ds_configs/zero2.json")
    assert line.startswith("deepspeed --num_gpus 2 launchers/pretrain.py --ds ds_configs/zero2")
    assert line.endswith("checkpoint.every=2")
    assert tiny("dsfm runs runs/") == "dsfm runs runs/"


@pytest.mark.parametrize("doc", [d for d in DOCS if d.name not in NOT_GUIDES], ids=lambda d: d.stem)
def test_every_command_in_the_guide_runs(doc, tmp_path):
    env = scratch_project(tmp_path)
    for i, (is_tiny, text) in enumerate(blocks(doc)):
        script = "\n".join(tiny(c) if is_tiny else c for c in commands(text))
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, (
            f"{doc.name} block {i + 1} exited {proc.returncode}:\n{script}\n--- stdout\n"
            f"{proc.stdout[-2000:]}\n--- stderr\n{proc.stderr[-4000:]}"
        )
