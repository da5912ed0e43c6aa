"""The run reader (`dsfm.observe.runs`) and the dashboard (`dsfm.observe.plot`) on hand-written
run dirs."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from dsfm.observe.plot import moving_average, plot_runs, save_figure
from dsfm.observe.rundir import read_metrics
from dsfm.observe.runs import load_run, status


def step_row(step: int, loss: float, val: float | None = None) -> dict:
    row = {"step": step, "tokens": 128 * step, "loss": loss, "lr": 1e-3, "grad_norm": 1.0,
           "tok_per_s": 5000.0, "mfu": None, "elapsed_s": 0.1 * step, "epoch": 0}  # fmt: skip
    if val is not None:
        row.update(val_loss=val, val_ppl=math.exp(val))
    return row


def make_run(path: Path, rows: list[dict], max_steps: int = 10) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "model": {"preset": "d4", "d_model": 256, "n_layers": 4, "vocab_size": 257},
        "data": {"path": "data/stdlib", "mix": []},
        "train": {"max_steps": max_steps, "seq_len": 32},
    }
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    (path / "ds_config.json").write_text(json.dumps({"train_batch_size": 4}))
    return path


# A run that logged steps 1-6, rolled back to 3 and went on to 5: steps 4-6 of the first
# attempt are superseded, and step 6 of the dead branch must not linger.
RESUMED = [
    *(step_row(s, 5.0 - 0.1 * s) for s in range(1, 7)),
    {"step": 6, "event": "rollback", "to_step": 3},
    *(step_row(s, 4.0 - 0.1 * s, val=4.1 if s == 5 else None) for s in range(4, 6)),
    {"step": 5, "event": "nonfinite", "value": float("nan"), "skipped": True},
]


def test_reader_keeps_the_current_history_and_sets_events_apart(tmp_path):
    run_dir = make_run(tmp_path / "resumed", RESUMED)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "tok')  # a row being written right now
    run = load_run(run_dir)
    assert [r["step"] for r in run.rows] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in run.rows] == pytest.approx([4.9, 4.8, 4.7, 3.6, 3.5])
    assert [e["event"] for e in run.events] == ["rollback", "nonfinite"]
    assert run.summary["steps"] == 5
    assert run.summary["best_val_loss"] == 4.1 and run.summary["best_val_step"] == 5
    assert run.summary["final_loss"] == pytest.approx(3.5)

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1.0}\n'
    )
    with pytest.raises(ValueError, match="metrics.jsonl:2 is not JSON"):
        read_metrics(bad)


def test_summary_follows_the_metrics_not_an_old_summary_json(tmp_path):
    run_dir = make_run(tmp_path / "r", [step_row(s, 3.0, val=3.5) for s in range(1, 5)])
    # written by an earlier invocation that ended at step 2 of a shorter schedule
    (run_dir / "summary.json").write_text(json.dumps({"steps": 2, "best_val_loss": 9.0}))
    summary = load_run(run_dir).summary
    assert (summary["steps"], summary["best_val_loss"]) == (4, 3.5)


def test_status_of_a_run(tmp_path):
    rows = [step_row(s, 3.0) for s in range(1, 5)]
    done = load_run(make_run(tmp_path / "done", rows, max_steps=4))
    assert status(done) == "complete"
    part = load_run(make_run(tmp_path / "part", rows, max_steps=10))
    mtime = (part.path / "metrics.jsonl").stat().st_mtime
    assert status(part, now=mtime + 10) == "running"
    assert status(part, now=mtime + 3600) == "stopped at 4 of 10"
    events = [*rows, {"step": 4, "event": "preempted"}]
    assert status(load_run(make_run(tmp_path / "pre", events)), now=mtime + 3600) == (
        "preempted at 4"
    )
    events = [*rows, {"step": 4, "event": "early_stop"}]
    assert status(load_run(make_run(tmp_path / "early", events))) == "early-stopped at 4"


def test_moving_average_is_centred_and_skips_nan():
    y = np.array([1.0, 3.0, np.nan, 5.0, 7.0])
    np.testing.assert_allclose(moving_average(y, 3), [2.0, 2.0, 4.0, 6.0, 6.0])
    np.testing.assert_allclose(moving_average(y, 2), [1.0, 2.0, 3.0, 5.0, 6.0])
    np.testing.assert_allclose(moving_average(y, 1)[[0, 1, 3, 4]], y[[0, 1, 3, 4]])


def test_dashboard_draws_each_runs_rows(tmp_path):
    a = make_run(tmp_path / "x" / "run", RESUMED)
    b = make_run(tmp_path / "y" / "run", [step_row(s, 4.0 - 0.2 * s) for s in range(1, 9)])
    fig = plot_runs([a, b], x="tokens", smooth=2)
    loss_ax, ppl_ax = fig.axes[0], fig.axes[1]
    lines = {line.get_gid(): line for ax in fig.axes for line in ax.get_lines()}
    for label, path in (("x/run", a), ("y/run", b)):  # equal names: parent dir in front
        rows = load_run(path).rows
        train = lines[f"{label}/train"]
        assert train.axes is loss_ax
        np.testing.assert_array_equal(train.get_xdata(), [r["tokens"] for r in rows])
        np.testing.assert_array_equal(train.get_ydata(), [r["loss"] for r in rows])
    np.testing.assert_array_equal(lines["x/run/val"].get_ydata(), [4.1])
    assert lines["x/run/val_ppl"].axes is ppl_ax
    # run b never evaluated: its perplexity panel shows exp(smoothed train loss)
    expected = np.exp(moving_average(np.array([r["loss"] for r in load_run(b).rows]), 2))
    np.testing.assert_allclose(lines["y/run/train_ppl"].get_ydata(), expected)
    assert [t.get_text() for t in fig.legends[0].get_texts()][:2] == ["x/run", "y/run"]
    assert lines["events"].get_xdata().tolist() == [5 * 128, 5 * 128]  # rollback, nonfinite
    assert len(fig.axes) == 5  # no MFU panel: every mfu is null (CPU)

    out = save_figure(fig, tmp_path / "plots" / "d.svg")
    assert out.read_text().lstrip().startswith("<?xml") and "<svg" in out.read_text()


def test_dashboard_refuses_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        plot_runs([tmp_path / "nowhere"])
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="plain is not a run directory"):
        plot_runs([tmp_path / "plain"])
    empty = make_run(tmp_path / "empty", [{"step": 0, "event": "warning", "message": "hi"}])
    with pytest.raises(ValueError, match="empty has no training steps"):
        plot_runs([empty])
    fig = plot_runs([make_run(tmp_path / "ok", [step_row(1, 3.0)])])
    with pytest.raises(ValueError, match=r"\.png, \.pdf or \.svg"):
        save_figure(fig, tmp_path / "d.jpeg")
    assert not os.path.exists(tmp_path / "d.jpeg")


def visible_tick_labels(axis) -> list[str]:
    low, high = sorted(axis.get_view_interval())
    return [t.get_text() for t in axis.get_majorticklabels()
            if low <= t.get_position()[axis.axis_name == "y"] <= high and t.get_text()]  # fmt: skip


def test_dashboard_memory_panel_and_readable_axes(tmp_path):
    """A CUDA run's mem_gb gets its panel; LR reads in scientific notation; a grad norm
    between 0.8 and 3 gets more than the 1 and 2 of a 1-2-5 log axis; a rising validation
    perplexity's last value is written inside its panel."""
    rows = []
    for s in range(1, 41):
        row = step_row(s, 4.0 - 0.02 * s, val=3.0 + 0.1 * s if s % 10 == 0 else None)
        row.update(lr=3e-3 * s / 40, grad_norm=0.8 + 2.2 * (s % 7) / 6, mem_gb=10.5 + 0.01 * s)
        rows.append(row)
    run = make_run(tmp_path / "gpu", rows, max_steps=40)
    fig = plot_runs([run])
    fig.canvas.draw()  # tick labels and text extents exist once drawn
    by_title = {ax.get_title(loc="left"): ax for ax in fig.axes}
    assert list(by_title) == ["Loss", "Perplexity", "Learning rate", "Gradient norm",
                              "Throughput", "GPU memory"]  # fmt: skip
    [mem] = [line for line in by_title["GPU memory"].get_lines() if line.get_gid() == "gpu/mem_gb"]
    np.testing.assert_allclose(mem.get_ydata(), [r["mem_gb"] for r in rows])
    assert by_title["GPU memory"].get_ylim()[0] == 0

    lr_labels = visible_tick_labels(by_title["Learning rate"].yaxis)
    assert "3e-3" in lr_labels and all(re.fullmatch(r"0|\d(\.\d)?e-\d", t) for t in lr_labels)
    assert {"1", "1.5", "2", "3"} <= set(visible_tick_labels(by_title["Gradient norm"].yaxis))

    ppl_ax = by_title["Perplexity"]
    [label] = [t for t in ppl_ax.texts if t.get_gid() == "gpu/val_ppl_last"]
    assert label.get_text() == f"{math.exp(7.0):.1f}"  # the highest point of the panel
    box, panel = label.get_window_extent(), ppl_ax.get_window_extent()
    assert panel.x0 <= box.x0 and box.x1 <= panel.x1 and panel.y0 <= box.y0 and box.y1 <= panel.y1
    save_figure(fig, tmp_path / "gpu.png")
