"""`dsfm runs` and `dsfm plot` on runs made by a real `dsfm train`."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import yaml
from conftest import TINY, dsfm, read_metrics


@pytest.fixture(scope="module")
def runs_dir(byte_data, tmp_path_factory):
    """runs/base: 6 real steps with evals at 3 and 6; runs/group/longer: a copy whose
    config asks for 12 steps and whose metrics were last written an hour ago."""
    root = tmp_path_factory.mktemp("runs")
    base = root / "base"
    dsfm("train", "--config", "configs/smoke.yaml", f"data.path={byte_data}",
         f"train.out_dir={base}", "train.max_steps=6", "eval.every=3", *TINY)  # fmt: skip
    longer = root / "group" / "longer"
    shutil.copytree(base, longer)
    config = yaml.safe_load((longer / "config.yaml").read_text())
    config["train"]["max_steps"] = 12
    (longer / "config.yaml").write_text(yaml.safe_dump(config))
    shutil.rmtree(longer / "checkpoints")  # params then come from the config
    hour_ago = (longer / "metrics.jsonl").stat().st_mtime - 3600
    os.utime(longer / "metrics.jsonl", (hour_ago, hour_ago))
    return root


def test_runs_lists_real_runs(runs_dir):
    listed = json.loads(dsfm("runs", str(runs_dir), "--json").stdout)
    assert [r["name"] for r in listed] == ["base", "group/longer"]
    rows = [r for r in read_metrics(runs_dir / "base") if "loss" in r]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    state = json.loads((runs_dir / "base/checkpoints/final/dsfm_state.json").read_text())
    for run in listed:
        assert run["steps"] == rows[-1]["step"] == 6
        assert run["tokens"] == rows[-1]["tokens"]
        assert run["best_val_loss"] == min(vals) and len(vals) == 2
        assert run["final_loss"] == rows[-1]["loss"]
        # from the checkpoint's client state (base) and from the config alone (longer)
        assert run["n_params"] == state["n_params"]
        assert (run["model"], run["zero_stage"], run["precision"]) == ("64×2", 0, "fp32")
        assert run["global_batch"] == 8 and run["seq_len"] == 32
    assert [r["status"] for r in listed] == ["complete", "stopped at 6 of 12"]
    assert [r["max_steps"] for r in listed] == [6, 12]

    table = dsfm("runs", str(runs_dir), "--sort", "best_val_loss").stdout
    assert "group/longer" in table and "stopped at 6 of 12" in table
    assert f"{min(vals):.4f}" in table and "6/12" in table

    (runs_dir.parent / "empty").mkdir(exist_ok=True)
    assert "no runs under" in dsfm("runs", str(runs_dir.parent / "empty")).stdout
    missing = dsfm("runs", str(runs_dir / "nope"), check=False)
    assert missing.returncode == 2 and "nope is not a directory" in missing.stderr


def test_plot_writes_a_dashboard_of_real_runs(runs_dir, tmp_path):
    from matplotlib.image import imread

    from dsfm.observe.plot import DPI, FIGSIZE_IN

    out = tmp_path / "dashboard.png"
    dsfm("plot", str(runs_dir / "base"), str(runs_dir / "group/longer"), "--out", str(out),
         "--x", "tokens", "--title", "two runs")  # fmt: skip
    image = imread(out)
    assert image.shape[:2] == (FIGSIZE_IN[1] * DPI, FIGSIZE_IN[0] * DPI)
    assert image[..., :3].std() > 0.05  # drawn on, not a blank canvas

    bad = dsfm("plot", str(runs_dir), "--out", str(tmp_path / "d.png"), check=False)
    assert bad.returncode == 2 and f"{runs_dir} is not a run directory" in bad.stderr
