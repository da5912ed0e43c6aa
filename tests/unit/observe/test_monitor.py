"""Watching a run: the monitor's rules on synthetic series, early stopping, the summary, the
sinks' files read back by their own readers, and the `log`/`eval` config checks."""

from __future__ import annotations

import csv
import json
import math
import random
import sys

import pytest

from dsfm.config.load import load_config
from dsfm.config.resolve import load_resolved
from dsfm.config.schema import ConfigError
from dsfm.observe import summary
from dsfm.observe.monitor import EarlyStopping, Monitor

W = 10  # plateau window for these series (the trainer uses monitor.WINDOW)


def healthy(n: int, seed: int = 0, warmup: int = 20):
    """Rows of a run that is fine: loss falls as a power law with noise, grad norm and
    throughput wobble, val loss falls every 50 steps."""
    rng = random.Random(seed)
    rows = []
    for step in range(1, n + 1):
        row = {
            "step": step,
            "loss": 2.0 + 4.0 * step**-0.3 + rng.gauss(0, 0.02),
            "lr": 1e-3 * min(1.0, step / warmup),
            "grad_norm": 1.0 + 0.5 * rng.random() + (3.0 if step < 5 else 0.0),
            "tok_per_s": 10_000 * (0.1 if step < 3 else 1.0) * rng.uniform(0.8, 1.2),
            "skipped": False,
        }
        if step % 50 == 0:
            row["val_loss"] = 2.1 + 4.0 * step**-0.3
            row["val_ppl"] = math.exp(row["val_loss"])
        rows.append(row)
    return rows


def alerts(rows, warmup: int = 20):
    m = Monitor(warmup_steps=warmup, window=W)
    return [a for r in rows for a in m.observe(r)]


def test_healthy_run_raises_nothing():
    assert alerts(healthy(3000)) == []


def test_loss_plateau_fires_once_after_warmup():
    rows = healthy(200)
    for r in rows[100:]:
        r["loss"] = 3.0 + 0.02 * math.sin(r["step"])  # stuck from step 101
    found = alerts(rows)
    assert [a.kind for a in found] == ["loss_plateau"]
    # two windows of a tenth of the steps seen (here 12 > W) after the loss got stuck
    assert found[0].step == 100 + 2 * 12 and "over the last 24 steps" in found[0].message
    assert "lower optim.lr" in found[0].message
    flat_from_start = [{**r, "loss": 3.0} for r in healthy(25)]
    assert alerts(flat_from_start, warmup=10) == []  # still before warmup + 2 windows


def test_overfitting_needs_val_rising_while_train_falls():
    def run(val_losses, train_falls=True):
        rows = healthy(50 * len(val_losses))
        for r in rows:
            r.pop("val_loss", None)
            if not train_falls:
                r["loss"] = 2.0 + r["step"] / 100
        for i, v in enumerate(val_losses):
            rows[50 * (i + 1) - 1]["val_loss"] = v
        return [a for a in alerts(rows) if a.kind != "loss_plateau"]

    found = run([3.0, 2.5, 2.6, 2.7, 2.8, 2.9])
    assert [(a.kind, a.step) for a in found] == [("overfitting", 250)]  # once per episode
    assert "more data" in found[0].message
    assert run([3.0, 2.5, 2.6, 2.7, 2.6, 2.7]) == []  # not 3 rises in a row
    assert [a.kind for a in run([3.0, 2.5, 2.6, 2.7, 2.8], train_falls=False)] == []  # diverging


def test_exploding_and_nonfinite_grad_norm():
    rows = healthy(100)
    rows[40]["grad_norm"] = rows[41]["grad_norm"] = 50.0  # one episode of two steps
    rows[70]["grad_norm"] = None  # not finite (metrics.jsonl holds null)
    found = alerts(rows)
    assert [(a.kind, a.step) for a in found] == [("grad_norm", 41), ("grad_norm", 71)]
    assert "x its running median" in found[0].message and "not finite" in found[1].message


def test_throughput_drop_is_sustained_not_one_slow_step():
    rows = healthy(100)
    rows[30]["tok_per_s"] = 100.0  # one hiccup
    for r in rows[60:80]:
        r["tok_per_s"] = 3_000.0  # another job arrives for 20 steps
    found = alerts(rows)
    assert [a.kind for a in found] == ["throughput"]
    assert 61 < found[0].step <= 64 and "other jobs" in found[0].message


def test_early_stopping_counts_evals_without_improvement_by_min_delta():
    es = EarlyStopping(patience=2, min_delta=0.1)
    assert [es.update(v, s) for s, v in [(1, 3.0), (2, 2.95), (3, 2.8), (4, 2.75)]] == [
        False,
        False,  # 2.95 is better but not by 0.1: one eval without improvement
        False,  # 2.8 beats 3.0 by 0.2: counter resets
        False,
    ]
    assert es.update(2.79, 5) and es.stopped and "(step 3)" in es.reason
    restored = EarlyStopping(patience=2, min_delta=0.1)
    restored.load_state_dict(json.loads(json.dumps(es.state_dict())))  # client state is JSON
    assert restored.stopped
    assert not EarlyStopping(0, 0.0).update(9.0, 1)  # patience 0: off
    off_now = EarlyStopping(0, 0.0)
    off_now.load_state_dict(es.state_dict())
    assert not off_now.stopped  # a restart with eval.patience=0 trains on


def test_summary_from_rows_with_event_rows():
    rows = healthy(100)
    rows[40]["grad_norm"] = 99.0
    m = Monitor(warmup_steps=20, window=W)
    logged = []
    for r in rows:
        r.update(tokens=r["step"] * 256, elapsed_s=r["step"] * 0.5, mfu=None)
        logged += [r, *(a.row() for a in m.observe(r))]
    logged.append({"step": 100, "event": "early_stop", "reason": "x"})
    steps = [r for r in logged if "event" not in r]
    events = [r for r in logged if "event" in r]
    s = summary.compute(steps, events, 200, ["best", "final"], "early_stop")
    assert (s["steps"], s["tokens"], s["warnings"]) == (100, 25_600, 1)
    assert s["tok_per_s"] == pytest.approx(512.0) and s["mfu"] is None
    assert (s["best_val_loss"], s["best_val_step"]) == (rows[99]["val_loss"], 100)
    assert s["early_stopped"] and s["final_loss"] == rows[-1]["loss"]
    json.dumps(s, allow_nan=False)  # strict JSON for other tools


STEP_ROWS = [
    {
        "step": 1,
        "tokens": 256,
        "loss": 5.5,
        "lr": 1e-3,
        "grad_norm": 2.0,
        "tok_per_s": 900.0,
        "mfu": None,
        "elapsed_s": 0.3,
        "epoch": 0,
        "skipped": False,
    },
    {
        "step": 2,
        "tokens": 512,
        "loss": 5.1,
        "lr": 2e-3,
        "grad_norm": 1.5,
        "tok_per_s": 1000.0,
        "mfu": None,
        "elapsed_s": 0.6,
        "epoch": 0,
        "skipped": False,
        "val_loss": 5.0,
        "val_ppl": math.exp(5.0),
    },
]


def test_csv_sink_fixed_header_and_resume(tmp_path):
    from dsfm.observe.sinks import CsvSink

    sink = CsvSink(tmp_path)
    sink.log(STEP_ROWS[0])
    sink.close()
    sink = CsvSink(tmp_path)  # a resumed run appends under the same header
    sink.log(STEP_ROWS[1])
    sink.close()
    with open(tmp_path / "metrics.csv", newline="") as f:
        got = list(csv.DictReader(f))
    assert list(got[0])[-2:] == ["val_loss", "val_ppl"]
    assert got[0]["val_loss"] == "" and got[0]["mfu"] == ""
    assert [float(r["loss"]) for r in got] == [5.5, 5.1] and float(got[1]["val_loss"]) == 5.0


def test_tensorboard_sink_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dsfm.observe.sinks import TensorBoardSink

    sink = TensorBoardSink(tmp_path)
    for row in STEP_ROWS:
        sink.log(row)
    sink.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert loss == [(1, 5.5), (2, pytest.approx(5.1))]
    assert [(e.step, e.value) for e in acc.Scalars("val/loss")] == [(2, 5.0)]
    assert "train/mfu" not in acc.Tags()["scalars"]  # null: left out


def test_log_and_patience_config_errors(monkeypatch):
    with pytest.raises(ConfigError) as e:
        load_config(
            None,
            ["log.sinks=[console,tensorbord]", "log.wandb_mode=cloud", "eval.patience=-1"],
        )
    text = str(e.value)
    assert "unknown sink 'tensorbord' (did you mean 'tensorboard'?)" in text
    assert "known sinks: console, csv, tensorboard, wandb" in text
    assert "log.wandb_mode must be one of online, offline, disabled" in text
    assert "eval.patience must be >= 0" in text
    with pytest.raises(ConfigError, match=r"set eval.every > 0"):
        load_config(None, ["eval.patience=2", "eval.every=0"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"`pip install wandb`") as e:
        load_resolved(None, ["log.sinks=[wandb]"])
    assert len([p for p in e.value.problems if "wandb" in p]) == 1
