"""Watching a real `dsfm train`: every sink agrees with metrics.jsonl, an injected gradient
spike raises a warning, the summary is printed and written, and early stopping ends a run
for good."""

from __future__ import annotations

import csv
import json

import pytest

from dsfm.observe import rundir
from dsfm.train import checkpoint
from tests.conftest import TINY, dsfm, read_metrics

SUMMARY_KEYS = {
    "steps",
    "max_steps",
    "tokens",
    "elapsed_s",
    "tok_per_s",
    "best_val_loss",
    "best_val_step",
    "final_loss",
    "mfu",
    "checkpoints",
    "warnings",
    "early_stopped",
    "stop_reason",
}


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))


def train(data, run_dir, *overrides):
    return dsfm(
        "train",
        "--ds",
        "ds_configs/zero0.json",
        "--config",
        "configs/smoke.yaml",
        f"data.path={data}",
        f"train.out_dir={run_dir}",
        *TINY,
        *overrides,
    )


def test_all_sinks_warning_and_summary(byte_data, tmp_path, monkeypatch, offline_wandb):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    monkeypatch.setenv("DSFM_FAULT", "spike_at=7")  # loss x50 at step 7: its grad norm explodes
    out = train(
        byte_data,
        run,
        "train.max_steps=8",
        "eval.every=4",
        "log.sinks=[console,csv,tensorboard,wandb]",
    ).stdout
    rows = read_metrics(run)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))

    warnings = [r for r in rows if r.get("event") == "warning"]
    assert [(w["step"], w["kind"]) for w in warnings] == [(7, "grad_norm")]
    assert f"warning at step 7: {warnings[0]['message']}" in out

    with open(run / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [int(r["step"]) for r in table] == list(range(1, 9))
    for c, j in zip(table, steps):
        for key in ("loss", "ppl", "lr", "grad_norm", "tok_per_s", "tokens"):
            assert float(c[key]) == j[key], key
        assert c["val_loss"] == (repr(j["val_loss"]) if "val_loss" in j else "")

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = [("train/loss", "loss"), ("train/ppl", "ppl"), ("train/lr", "lr")]
    for tag, key in [*tags, ("val/loss", "val_loss"), ("val/ppl", "val_ppl")]:
        want = [(r["step"], r[key]) for r in steps if key in r]
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert got == [(s, pytest.approx(v, rel=1e-6)) for s, v in want], tag  # float32
    assert len(list((run / "wandb").glob("offline-run-*/run-*.wandb"))) == 1

    summary = json.loads((run / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS
    evals = [r for r in steps if "val_loss" in r]
    best = min(evals, key=lambda r: r["val_loss"])
    assert [r["step"] for r in evals] == [4, 8]
    assert (summary["best_val_loss"], summary["best_val_step"]) == (best["val_loss"], best["step"])
    assert (summary["steps"], summary["tokens"]) == (8, steps[-1]["tokens"])
    assert summary["final_loss"] == steps[-1]["loss"] and summary["mfu"] is None
    assert summary["warnings"] == 1 and summary["checkpoints"] == ["best", "final"]
    assert not summary["early_stopped"] and summary["stop_reason"] == "max_steps"
    assert "run summary" in out and "step 8/8" in out


def test_early_stop_saves_final_and_a_restart_does_not_train(byte_data, tmp_path):
    run = tmp_path / "run"
    # No eval after the first can beat it by 10 nats: the 3rd eval ends the run.
    args = [
        "train.max_steps=8",
        "eval.every=1",
        "eval.patience=2",
        "eval.min_delta=10",
        "log.sinks=[csv]",
    ]
    out = train(byte_data, run, *args).stdout
    rows = read_metrics(run)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    stop = [r for r in rows if r.get("event") == "early_stop"]
    assert len(stop) == 1 and stop[0]["step"] == 3 and "eval.patience=2" in stop[0]["reason"]
    assert "early stop at step 3" in out
    assert "step 1/8" not in out and "run summary" in out  # no console sink: summary only
    ckpts = run / "checkpoints"
    assert checkpoint.latest_tag(ckpts) == "final"
    assert checkpoint.client_state(ckpts, "final")["step"] == 3
    summary = json.loads((run / "summary.json").read_text())
    assert summary["early_stopped"] and summary["stop_reason"] == "early_stop"
    assert summary["steps"] == 3 and summary["checkpoints"] == ["best", "final"]

    out = train(byte_data, run, *args).stdout
    assert "run already complete: it stopped early at step 3" in out
    assert read_metrics(run) == rows  # not one step more


def test_wandb_is_one_run_across_a_stop_and_resume(byte_data, tmp_path, offline_wandb):
    """A time-boxed invocation (`train.stop_at`) and the one that continues it log to one W&B
    run: both offline runs carry the id kept in the run directory. On CPU no mem_gb."""
    run = tmp_path / "run"
    for more in (["train.stop_at=2"], []):
        train(byte_data, run, "train.max_steps=4", "eval.every=0", "log.sinks=[wandb]", *more)
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4]  # resumed at 2
    assert not any("mem_gb" in r for r in read_metrics(run))
    offline = sorted((run / "wandb").glob("offline-run-*"))
    ids = [next(d.glob("run-*.wandb")).stem.removeprefix("run-") for d in offline]
    assert len(ids) == 2 and ids[0] == ids[1] == rundir.read_wandb_run_id(run)
