"""What the run shows a newcomer: train perplexity beside val perplexity in every sink, the
uniform baseline, and each eval's samples on the console."""

from __future__ import annotations

import csv
import json
import math

import pytest

from dsfm.config.schema import LogConfig
from dsfm.observe.metrics import RunLogger, sample_line, uniform_baseline

ROW = {
    "step": 2,
    "tokens": 512,
    "loss": 5.0,
    "ppl": math.exp(5.0),
    "lr": 1e-3,
    "grad_norm": 1.0,
    "tok_per_s": 1000.0,
    "mfu": None,
    "elapsed_s": 0.6,
    "epoch": 0,
    "skipped": False,
    "val_loss": 5.5,
    "val_ppl": math.exp(5.5),
}


def test_train_and_val_perplexity_in_every_sink(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = RunLogger(
        tmp_path, True, 2, log_cfg=LogConfig(sinks=["console", "csv", "tensorboard"]), log_every=1
    )
    log.info(uniform_baseline(1024))
    log.log(ROW)
    log.sample({"step": 2, "prompt": "def ", "completion": "f(x):\n" + "  return x\n" * 40})
    log.close()
    out = capsys.readouterr().out
    assert "ln V = ln 1024 = 6.93 (ppl 1024)" in out
    assert "loss 5.0000 (ppl 148.4)" in out and "val loss 5.5000 (ppl 244.7)" in out
    (line,) = [x for x in out.splitlines() if x.startswith("sample @ step 2: ")]
    assert line.startswith("sample @ step 2: 'def ' -> 'f(x):\\n  return x\\n")
    assert len(line) < 200  # cut
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["ppl"] == math.exp(5.0)
    with open(tmp_path / "metrics.csv", newline="") as f:
        (got,) = list(csv.DictReader(f))
    assert float(got["ppl"]) == math.exp(5.0) and float(got["val_ppl"]) == math.exp(5.5)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert {"train/ppl", "val/ppl", "train/loss", "val/loss"} <= set(acc.Tags()["scalars"])
    assert acc.Scalars("train/ppl")[0].value == pytest.approx(math.exp(5.0), rel=1e-6)
    samples = (tmp_path / "samples.jsonl").read_text()
    assert json.loads(samples)["completion"].count("return") == 40  # the file keeps it all


def test_samples_stay_off_the_console_without_the_console_sink(tmp_path, capsys):
    log = RunLogger(tmp_path, True, 2, log_cfg=LogConfig(sinks=["csv"]))
    log.sample({"step": 1, "prompt": "The ", "completion": "end"})
    log.close()
    assert capsys.readouterr().out == ""
    off = RunLogger(tmp_path, False, 2)  # ranks other than 0
    off.sample({"step": 1, "prompt": "The ", "completion": "end"})
    assert capsys.readouterr().out == ""


def test_sample_line_quotes_and_cuts():
    line = sample_line({"step": 5, "prompt": "The ", "completion": "x" * 500}, limit=20)
    assert line == "sample @ step 5: 'The ' -> '" + "x" * 20 + "…'"
