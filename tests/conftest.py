"""Shared fixtures: small real datasets and a runner for real (multi-process) DeepSpeed jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Without a GPU, Triton kernels run in Triton's interpreter (tests/unit/model/test_ops.py).
# Decided here, before any test imports triton: it fixes the choice per process at import.
# On a CUDA machine they compile for the device, where the GPU tier tests them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A tiny model that still has every part (GQA, RoPE, SwiGLU); fp32 so runs compare exactly.
TINY = [
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.max_seq_len=64",
    "train.seq_len=32",
    "train.micro_batch_size=4",
    "train.grad_accum=2",
    "train.precision=fp32",
    "optim.lr=3e-3",
    "schedule.warmup_steps=2",
    "eval.batches=2",
    "eval.max_new_tokens=8",
    "eval.prompts=[def ]",
    "train.log_every=1",
]


def job_env() -> dict[str, str]:
    """The environment of a job the tests start: CPU DeepSpeed, and this interpreter's bin
    directory first on PATH, as in an activated venv. DeepSpeed JIT-builds its ops with the
    `ninja` found there; two ninjas (the venv's and the system's) would each call the
    other's build out of date and build it again (~30 s each time)."""
    bin_dir = os.path.dirname(sys.executable)
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def run_cmd(
    cmd: list[str], timeout: int = 600, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run `cmd` in the repository root with the job environment (plus `env`)."""
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        env={**job_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n"
            f"{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def deepspeed_cmd(
    ds: str,
    overrides: list[str],
    nprocs: int = 2,
    port: int = 29510,
    launcher: str = "launchers/pretrain.py",
) -> list[str]:
    """`deepspeed --num_gpus N LAUNCHER --ds ds_configs/DS.json OVERRIDES...`."""
    return [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(nprocs),
        "--master_port",
        str(port),
        launcher,
        "--ds",
        f"ds_configs/{ds}.json",
        *overrides,
    ]


def deepspeed_train(
    ds: str,
    overrides: list[str],
    nprocs: int = 2,
    port: int = 29510,
    check: bool = True,
    launcher: str = "launchers/pretrain.py",
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Real DeepSpeed launcher, real ranks: `deepspeed --num_gpus N launchers/pretrain.py`."""
    return run_cmd(deepspeed_cmd(ds, overrides, nprocs, port, launcher), check=check, env=env)


def dsfm(*args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    return run_cmd([sys.executable, "-m", "dsfm.cli", *args], check=check, timeout=timeout)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def byte_data(tmp_path_factory) -> Path:
    """~400 KB of the embedded corpus, byte-level tokens (vocab 257)."""
    from dsfm.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "stdlib_bytes"
    prepare(["stdlib"], out, tokenizer="byte", max_bytes=400_000, val_fraction=0.05, progress=False)
    return out


@pytest.fixture(scope="session")
def bpe_data(tmp_path_factory) -> Path:
    """~2 MB of the embedded corpus with a trained 2048-token BPE."""
    from dsfm.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "stdlib_bpe"
    prepare(
        ["stdlib"], out, vocab_size=2048, max_bytes=2_000_000, val_fraction=0.02, progress=False
    )
    return out


CHAT_WORDS = "apple river stone cloud tiger green paper light music ocean bread chair".split()


@pytest.fixture(scope="session")
def chat_run(tmp_path_factory) -> Path:
    """A tiny chat model trained from scratch (`dsfm prepare --chat`, then `dsfm train`, one
    process) to answer "Say WORD." with "WORD!" and its end-of-turn token: a run directory."""
    from dsfm.data.tokenizer import byte_tokenizer

    root = tmp_path_factory.mktemp("chat")
    with open(root / "chats.jsonl", "w") as f:
        for i in range(400):
            word = CHAT_WORDS[i * 7 % len(CHAT_WORDS)]
            turns = [
                {"role": "user", "content": f"Say {word}."},
                {"role": "assistant", "content": f"{word}!"},
            ]
            if i % 2:
                turns.insert(0, {"role": "system", "content": "Be brief."})
            f.write(json.dumps({"messages": turns}) + "\n")
    byte_tokenizer().save(root)
    dsfm(
        "prepare",
        "--chat",
        "--input",
        str(root / "chats.jsonl"),
        "--tokenizer",
        str(root),
        "--out",
        str(root / "data"),
        "--val-fraction",
        "0.05",
    )
    run = root / "run"
    dsfm(
        "train",
        *TINY,
        f"data.path={root / 'data'}",
        f"train.out_dir={run}",
        "train.seq_len=64",
        "train.micro_batch_size=8",
        "train.grad_accum=1",
        "train.max_steps=60",
        "schedule.warmup_steps=5",
        "eval.every=0",
        "checkpoint.every=0",
        "train.log_every=10",
    )
    return run
