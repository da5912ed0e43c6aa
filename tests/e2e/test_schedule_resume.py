"""Epochs, exact LR schedules, epoch tags and resuming from a chosen tag, through `dsfm train`
(one process, ZeRO-0 fp32: bit-exact on CPU).

One small real dataset (37 training samples of 32 tokens, no val split; a global batch of
8): 3 epochs resolve to ceil(3 x 37 / 8) = 14 updates, and passes complete at steps 5
(40 samples >= 37), 10 (80 >= 74) and 14.
"""

from __future__ import annotations

import shutil
import sys

import pytest
import torch

from dsfm.config.schema import ScheduleConfig
from dsfm.data.dataset import TokenDataset
from dsfm.observe import rundir
from dsfm.train import checkpoint
from dsfm.train.schedule import lr_at
from tests.conftest import TINY, dsfm, read_metrics, run_cmd

STEPS, PEAK = 14, 3e-3
SCHEDULE = ScheduleConfig(kind="cosine", warmup_steps=3, min_lr_ratio=0.1)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from dsfm.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "small"
    prepare(["stdlib"], out, tokenizer="byte", max_bytes=1200, val_fraction=0.0, progress=False)
    assert len(TokenDataset(out, "train", 32)) == 37
    return out


def args(data, run_dir, *more):
    return [
        *TINY,
        f"data.path={data}",
        f"train.out_dir={run_dir}",
        "schedule.kind=cosine",
        "schedule.warmup_steps=3",
        "eval.every=0",
        "checkpoint.every=4",
        "checkpoint.keep_last=2",
        "checkpoint.every_epoch=true",
        *more,
    ]


def steps(run_dir):
    """Step rows as the run reads them: a step trained again (resume, rollback) replaces
    the rows from it on."""
    return rundir.read_metrics(run_dir)[0]


@pytest.fixture(scope="module")
def full_run(small_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sched") / "full"
    out = dsfm("train", *args(small_data, run_dir, "train.epochs=3"))
    return run_dir, out.stdout


def test_epochs_resolve_print_and_tag(full_run):
    run_dir, stdout = full_run
    assert f"train.epochs=3: 37 samples per pass / global batch 8 -> train.max_steps={STEPS}" in (
        stdout
    )
    assert [r["step"] for r in steps(run_dir)] == list(range(1, STEPS + 1))
    ckpts = run_dir / "checkpoints"
    # keep_last=2 pruned step_4; epoch tags are kept besides, like best and final
    assert set(checkpoint.published_tags(ckpts)) == {
        "step_00000008",
        "step_00000012",
        "epoch_1",
        "epoch_2",
        "epoch_3",
        "final",
    }
    passes = {f"epoch_{n}": checkpoint.client_state(ckpts, f"epoch_{n}") for n in (1, 2, 3)}
    assert [s["step"] for s in passes.values()] == [5, 10, 14]
    assert [s["sampler"]["consumed_samples"] for s in passes.values()] == [40, 80, 112]


def test_lr_column_is_the_closed_form(full_run):
    lrs = [r["lr"] for r in steps(full_run[0])]
    assert lrs == [lr_at(k, SCHEDULE, PEAK, STEPS) for k in range(STEPS)]
    assert lrs[2] == PEAK and lrs[-1] == pytest.approx(PEAK * 0.1, rel=1e-12)
    assert lrs[:3] == pytest.approx([PEAK / 3, 2 * PEAK / 3, PEAK], rel=1e-15)
    # the optimizer itself used it (not only the row): its saved groups hold the last LR
    for tag, step in (("step_00000012", 12), ("final", STEPS)):
        states = torch.load(
            full_run[0] / "checkpoints" / tag / "mp_rank_00_model_states.pt",
            map_location="cpu",
            weights_only=False,
        )
        assert [g["lr"] for g in states["optimizer"]["param_groups"]] == [lrs[step - 1]] * 2


def test_resume_from_a_step_tag_into_a_new_run(full_run, small_data, tmp_path):
    """Weights, optimizer, schedule and data position come from step 8 of the full run;
    the new run's steps 9..14 are the full run's, bit for bit."""
    full, _ = full_run
    run_dir = tmp_path / "branch"
    source = full / "checkpoints" / "step_00000008"
    out = dsfm("train", *args(small_data, run_dir, "train.epochs=3", f"train.resume_from={source}"))
    assert f"resumed from {source} at step 8" in out.stdout
    got = [(r["step"], r["loss"], r["lr"]) for r in steps(run_dir)]
    assert got == [(r["step"], r["loss"], r["lr"]) for r in steps(full)[8:]]
    # the data position came along: pass 2 still completes at step 10, pass 3 at 14
    assert {"epoch_2", "epoch_3", "final"} <= set(
        checkpoint.published_tags(run_dir / "checkpoints")
    )
    assert checkpoint.client_state(run_dir / "checkpoints", "epoch_2")["step"] == 10


def test_rewind_in_place_with_a_rollback_then_requeue(full_run, small_data, tmp_path):
    """resume_from=epoch_1 rewinds a copy of the full run to step 5; NaN losses at steps 7
    and 8 roll back to step 6 with half the LR: every LR is still the closed form (times the
    rollback scale). The same command again (a requeued job) goes on from the run's own
    latest tag instead of rewinding again."""
    run_dir = tmp_path / "rewind"
    shutil.copytree(full_run[0], run_dir)
    cmd = [
        sys.executable,
        "-m",
        "dsfm.cli",
        "train",
        *args(small_data, run_dir, "train.epochs=3", "train.resume_from=epoch_1"),
        "checkpoint.every=2",
        "train.max_bad_steps=2",
        "train.rollback_lr_scale=0.5",
    ]
    out = run_cmd(cmd, env={"DSFM_FAULT": "nan_at=7-8"})
    assert "resumed from" in out.stdout and "epoch_1 at step 5" in out.stdout
    rows = read_metrics(run_dir)
    rollback = next(r for r in rows if r.get("event") == "rollback")
    assert rollback["to_tag"] == "step_00000006" and rollback["lr_scale"] == 0.5
    lrs = [(r["step"], r["lr"]) for r in steps(run_dir)]
    assert lrs == [
        (k + 1, lr_at(k, SCHEDULE, PEAK, STEPS) * (0.5 if k >= 6 else 1.0)) for k in range(STEPS)
    ]
    again = run_cmd(cmd)
    assert "already continued from it; going on from final" in again.stdout
    assert "run already complete at step 14" in again.stdout
    assert [(r["step"], r["lr"]) for r in steps(run_dir)] == lrs


def test_a_missing_tag_or_another_models_tag_is_refused(full_run, small_data):
    out = dsfm("train", *args(small_data, full_run[0], "train.resume_from=step_3"), check=False)
    assert out.returncode == 2
    assert "no complete tag step_00000003" in out.stderr and "epoch_1" in out.stderr
    # a tag of another model: the same check as any restart, before anything is built
    other = [*args(small_data, full_run[0].parent / "other"), "model.n_layers=3"]
    out = dsfm("train", *other, f"train.resume_from={full_run[0]}", check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "holds a different model" in out.stderr and "model.n_layers: checkpoint 2" in out.stderr
