"""Fault injection with real ranks and real DeepSpeed: kills, SIGTERM, NaN batches, loss
spikes, a truncated checkpoint and a hung rank. Faults come from the
`DSFM_FAULT` hook (dsfm/faults.py) or from real signals sent to one rank's process.

Every recovered run must end bit-identical to an uninterrupted one (fp32 on CPU: resume is
exact), so "nothing lost beyond the steps since the last checkpoint" is checked on the
final weights, not on logs.

DSFM_KILL_TRIALS (default 6 in CI: each kind of fault once) sets how many faults the kill
test injects; DSFM_KILL_SEED picks the random points.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dsfm.interop.weights import load_weights
from dsfm.train import checkpoint
from tests.conftest import ROOT, TINY, deepspeed_cmd, job_env, read_metrics

pytestmark = pytest.mark.distributed
STEPS = 16
TRIALS = int(os.environ.get("DSFM_KILL_TRIALS", "6"))
SAVE_PHASES = ("save_shards", "save_publish", "save_done")
KINDS = ("step", *SAVE_PHASES, "kill9_any_time", "sigterm")


def common(byte_data, run_dir: Path, steps: int = STEPS) -> list[str]:
    return [
        *TINY,
        f"data.path={byte_data}",
        f"train.out_dir={run_dir}",
        f"train.max_steps={steps}",
        "eval.every=0",
        "checkpoint.every=2",
        "checkpoint.keep_last=2",
        "checkpoint.save_best=false",
    ]


def train(ds: str, overrides: list[str], port: int, fault: str | None = None, nprocs: int = 2):
    env = job_env()
    if fault:
        env["DSFM_FAULT"] = fault
    return subprocess.run(
        deepspeed_cmd(ds, overrides, nprocs, port),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpts = run_dir / "checkpoints"
    return load_weights(ckpts, "final", checkpoint.client_state(ckpts, "final"))


def assert_same_weights(run_dir: Path, reference: Path) -> None:
    a, b = final_weights(run_dir), final_weights(reference)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def engine_state(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor DeepSpeed saved (weights, Adam moments and step counts): what must not
    change when an update is skipped. (The LR is no state: the trainer's function of its
    step counter.)"""
    out = {}

    def walk(obj, prefix):
        if isinstance(obj, torch.Tensor):
            out[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{prefix}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{prefix}/{i}")

    for f in sorted(tag_dir.glob("*.pt")):
        if not f.name.startswith("rng_"):
            sd = torch.load(f, map_location="cpu", weights_only=False)
            walk(sd, f.name)
    return out


def same_state(a: Path, b: Path) -> bool:
    sa, sb = engine_state(a), engine_state(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def reference(byte_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("faults") / "reference"
    ok(train("zero2", common(byte_data, run_dir), port=29600))
    return run_dir


def resumable_step(run_dir: Path) -> int:
    ckpts = run_dir / "checkpoints"
    tag = checkpoint.resumable_tag(ckpts, warn=False)
    return 0 if tag is None else checkpoint.client_state(ckpts, tag)["step"]


def rank_pid(run_dir: Path, rank: int) -> int | None:
    out = subprocess.run(
        ["pgrep", "-f", f"local_rank={rank} .*train.out_dir={run_dir}"],
        capture_output=True,
        text=True,
    ).stdout.split()
    return int(out[0]) if out else None


def signal_rank_after_progress(
    cmd: list[str], run_dir: Path, rank: int, sig: str, after_step: int, delay_s: float
) -> subprocess.CompletedProcess:
    """Start a run, wait until it logged a step past `after_step`, then signal one rank. Each
    step takes 0.3 s longer (DSFM_FAULT step_s), so the >= 2 steps left outlast the delay
    (<= 0.5 s): the signal lands in a running job, not after it finished."""
    env = {**job_env(), "DSFM_FAULT": "step_s=0.3"}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    metrics = run_dir / "metrics.jsonl"
    old_rows = len(read_metrics(run_dir)) if metrics.is_file() else 0
    deadline = time.time() + 240

    def progressed() -> bool:  # a row this launch wrote
        if not metrics.is_file():
            return False
        new = read_metrics(run_dir)[old_rows:]
        return any(r.get("step", 0) > after_step for r in new if "loss" in r)

    while not progressed() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(delay_s)
    pid = rank_pid(run_dir, rank)
    if pid is not None and proc.poll() is None:
        subprocess.run(["kill", f"-{sig}", str(pid)])
    out = proc.communicate(timeout=240)[0]
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def test_random_kills_and_sigterm_lose_nothing(byte_data, reference, tmp_path):
    """Kill -9 one random rank at random points (mid-step, mid-save, between publish and
    `latest`, after a save, or at an arbitrary time) or SIGTERM it; restart the same run
    dir every time. Each restart resumes from a complete checkpoint, redoes at most the steps
    since the last save (checkpoint.every=2), and the finished run equals an uninterrupted one
    bit for bit. More trials than CI's default get a longer run (3 steps per trial)."""
    rng = random.Random(int(os.environ.get("DSFM_KILL_SEED", "0")))
    steps = max(STEPS, 3 * TRIALS)
    run_dir = tmp_path / "killed"
    args = common(byte_data, run_dir, steps)
    if steps != STEPS:
        reference = tmp_path / "reference"
        ok(train("zero2", common(byte_data, reference, steps), port=29601))
    table = []
    first = rng.sample(KINDS, len(KINDS))  # every kind once (CI's 6 trials), then at random
    for trial in range(TRIALS):
        done = resumable_step(run_dir)
        if done >= steps - 2:
            break
        rank = rng.randrange(2)
        kind = first[trial] if trial < len(first) else rng.choice(KINDS)
        step = min(done + rng.randint(1, 3), steps - 1)
        if kind in SAVE_PHASES:
            step += step % 2  # saves happen at even steps
        if kind == "save_publish":
            rank = 0  # publishing (rename, `latest`) is rank 0's job
        cmd = deepspeed_cmd("zero2", args, port=29610 + trial % 30)
        if kind in ("kill9_any_time", "sigterm"):
            sig = "KILL" if kind == "kill9_any_time" else "TERM"
            proc = signal_rank_after_progress(
                cmd, run_dir, rank, sig, done, delay_s=rng.uniform(0, 0.5)
            )
        else:
            fault = f"kill_at={step}:{kind},rank={rank}"
            proc = train("zero2", args, 29610 + trial % 30, fault=fault)
        out = proc.stdout + proc.stderr
        if kind == "sigterm":
            assert proc.returncode == 75, out[-3000:]  # EXIT_REQUEUE: saved, run again
            stopped = [r for r in read_metrics(run_dir) if r.get("event") == "preempted"]
            assert stopped and resumable_step(run_dir) == stopped[-1]["step"]
        else:
            assert proc.returncode != 0, out[-3000:]
        reached = max(r["step"] for r in read_metrics(run_dir) if "loss" in r)
        resumed = resumable_step(run_dir)
        assert resumed >= done  # a published checkpoint is never lost
        assert reached - resumed <= 2  # only the steps since the last checkpoint are redone
        if kind == "save_done":
            assert resumed == step  # `latest` moved before the kill: that save counts
        table.append(
            (trial, kind, rank, step if kind in (*SAVE_PHASES, "step") else "-", reached, resumed)
        )
    print("\n(trial, fault, rank, kill step, last logged step, resumable step)", *table, sep="\n")
    ok(train("zero2", args, port=29640))
    assert_same_weights(run_dir, reference)
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]


def test_truncated_checkpoint(byte_data, reference, tmp_path):
    """(A full disk and a read-only directory are real in test_save_failures.py.)"""
    run_dir = tmp_path / "disk"
    args = common(byte_data, run_dir)
    ckpts = run_dir / "checkpoints"
    # 1. run to step 8, then truncate a shard of the newest tag (a bad disk, a cut copy)
    ok(train("zero2", [*args, "train.stop_at=8"], 29652))
    assert checkpoint.latest_tag(ckpts) == "step_00000008"
    shard = next((ckpts / "step_00000008").glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:1000])
    # 2. resume falls back to step 6 with a warning and still ends where the reference ends
    proc = ok(train("zero2", args, 29654))
    out = proc.stdout + proc.stderr  # warnings go to stderr
    assert "skipping checkpoint" in out and "resumed from" in out and "step_00000006" in out
    assert_same_weights(run_dir, reference)


def test_nan_steps_spikes_and_rollback(byte_data, tmp_path):
    """ZeRO-3: a NaN loss on one rank skips the update on both (the saved engine state is
    bit-identical before and after); three in a row roll back to the checkpoint before the
    streak and training goes on past the bad batches; a loss spike with train.spike_skip
    is logged and discarded the same way."""
    run_dir = tmp_path / "nan"
    args = [
        *common(byte_data, run_dir, steps=11),
        "checkpoint.every=1",
        "checkpoint.keep_last=20",
        "train.max_bad_steps=3",
        "train.spike_sigma=4",
        "train.spike_skip=true",
    ]
    ok(train("zero3", args, 29660, fault="nan_at=3+6-8,spike_at=10,rank=1"))
    ckpts = run_dir / "checkpoints"
    assert same_state(ckpts / "step_00000002", ckpts / "step_00000003")  # skipped: no change
    assert not same_state(ckpts / "step_00000003", ckpts / "step_00000004")  # applied
    assert same_state(ckpts / "step_00000009", ckpts / "step_00000010")  # spike skipped
    assert not same_state(ckpts / "step_00000010", ckpts / "final")
    rows = read_metrics(run_dir)
    # the trainer's own events; the monitor's warnings (grad norm not finite) are not asserted
    events = [(r["step"], r["event"]) for r in rows if r.get("event", "warning") != "warning"]
    assert events == [
        (3, "nonfinite"),
        (6, "nonfinite"),
        (7, "nonfinite"),
        (8, "nonfinite"),
        (5, "rollback"),
        (10, "spike"),
    ]
    rollback = next(r for r in rows if r.get("event") == "rollback")
    assert rollback["to_tag"] == "step_00000005" and rollback["consumed_samples"] == 8 * 16
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8, 6, 7, 8, 9, 10, 11]  # replayed from 6, fresh data
    state = checkpoint.client_state(ckpts, "final")
    assert state["sampler"]["consumed_samples"] == (11 + 3) * 16  # the bad batches stay skipped
    assert state["rollbacks"] == 1 and state["bad_steps"] == 5


@pytest.mark.parametrize("stage, port", [("zero0", 29670), ("zero2", 29675)])
def test_nan_skip_leaves_engine_state_unchanged(byte_data, tmp_path, stage, port):
    """ZeRO-0 fp32 is the one case where DeepSpeed would apply a NaN update (torch AdamW), so
    dsfm stops it; ZeRO-2 discards it itself. Either way weights and Adam moments stay
    bit-identical (ZeRO-3 is covered by the rollback test)."""
    run_dir = tmp_path / stage
    args = [*common(byte_data, run_dir, steps=3), "checkpoint.every=1"]
    ok(train(stage, args, port, fault="nan_at=2,rank=0"))
    ckpts = run_dir / "checkpoints"
    assert same_state(ckpts / "step_00000001", ckpts / "step_00000002")
    assert not same_state(ckpts / "step_00000002", ckpts / "final")
    rows = [r for r in read_metrics(run_dir) if r.get("event", "warning") != "warning"]
    events = [(r["step"], r["event"], r["skipped"]) for r in rows]
    assert events == [(2, "nonfinite", True)]


def test_hung_rank_is_reported_and_the_job_exits(byte_data, tmp_path):
    run_dir = tmp_path / "hang"
    args = [*common(byte_data, run_dir), "train.watchdog_s=15"]
    proc = train("zero2", args, 29680, fault="hang_at=3,rank=1")  # times out at 300 s if hung
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    # Rank 1 sleeps, rank 0 waits for it in the loss all-reduce: both are stuck after step 2,
    # and whichever watchdog fires first names itself; the launcher then stops the other.
    assert re.search(r"watchdog: rank [01] stuck for \d+s in step after step 2", out), out[-3000:]
    assert checkpoint.latest_tag(run_dir / "checkpoints") == "step_00000002"  # still resumable


@pytest.mark.parametrize("stage, port", [("zero2", 29690), ("zero3", 29695)])
def test_resume_on_a_different_number_of_ranks(byte_data, reference, tmp_path, stage, port):
    """2 ranks to step 4, 1 rank to step 8, 2 ranks to the end, keeping the global batch
    (grad_accum 2 -> 4 -> 2). Losses match the uninterrupted 2-rank ZeRO-2 run to rtol 1e-4:
    the data and LR are the same (asserted exactly), only the order of the fp32 gradient sums
    differs (rank average vs accumulation), ~1e-7 per step, the same size as the ZeRO-stage
    differences test_zero.py bounds with that tolerance over these few Adam steps."""
    run_dir = tmp_path / stage
    args = common(byte_data, run_dir)
    ok(train(stage, [*args, "train.stop_at=4"], port))
    out = ok(train(stage, [*args, "train.stop_at=8", "train.grad_accum=4"], port + 1, nprocs=1))
    assert "written by 2 rank(s), this run has 1" in out.stdout
    out = ok(train(stage, args, port + 2))
    assert "written by 1 rank(s), this run has 2" in out.stdout
    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    ref = [r for r in read_metrics(reference) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [(r["lr"], r["tokens"]) for r in rows] == [(r["lr"], r["tokens"]) for r in ref]
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in ref], rtol=1e-4)
    state = checkpoint.client_state(run_dir / "checkpoints", "final")
    assert state["world_size"] == 2 and state["sampler"]["consumed_samples"] == STEPS * 16
    assert not [p for p in (run_dir / "checkpoints").iterdir() if "universal" in p.name]
