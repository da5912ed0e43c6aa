"""`dsfm train` from the files people have: `--data FILE` prepares a cached dataset beside
the run and reuses it; no data at all trains on the embedded corpus; and what the run
shows (train ppl beside val ppl, the uniform baseline, samples at each eval)."""

from __future__ import annotations

import json
import math
import re
import sys

import pytest

from dsfm.data.corpus import stdlib_documents
from tests.conftest import TINY, dsfm, read_metrics, run_cmd

STEPS = ["train.max_steps=4", "eval.every=2", "checkpoint.every=0"]


@pytest.fixture(scope="module")
def jsonl_run(tmp_path_factory):
    """One JSONL file of raw documents, trained on twice: prepared, then reused."""
    root = tmp_path_factory.mktemp("train_data")
    corpus = root / "corpus.jsonl"
    with open(corpus, "w") as f:
        for doc in stdlib_documents(400_000):
            f.write(json.dumps({"text": doc}) + "\n")
    run = root / "run"
    args = ["train", "--data", str(corpus), *TINY, "model.vocab_size=512", f"train.out_dir={run}"]
    first = dsfm(*args, *STEPS)
    second = dsfm(*args, *STEPS, "train.max_steps=6")  # goes on: same data, cache reused
    return run, first.stdout, second.stdout


def test_raw_jsonl_is_prepared_beside_the_run_then_reused(jsonl_run):
    run, first, second = jsonl_run
    (entry,) = (run / "data").glob("corpus-*")  # one cached dataset, in the run directory
    assert entry.name.startswith("corpus-") and (entry / "meta.json").is_file()
    assert f"data: preparing {run.parent / 'corpus.jsonl'} into {entry}" in first
    assert "reusing it" in second and "preparing" not in second
    assert "resumed from" in second and "at step 4" in second
    config = (run / "config.yaml").read_text()
    assert f"path: {entry}" in config
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_train_ppl_baseline_and_samples_are_shown(jsonl_run):
    run, first, _ = jsonl_run
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert all(r["ppl"] == pytest.approx(math.exp(r["loss"])) for r in rows)
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert "baseline: a model that knows nothing scores ln V = ln 512 = 6.24" in first
    assert re.search(r"step 2/4 \| loss [\d.]+ \(ppl [\d.]+\) .*\| val loss [\d.]+ \(ppl", first)
    assert len(re.findall(r"^sample @ step [24]: 'def ?' -> '", first, re.M)) == 2
    assert abs(rows[0]["loss"] - math.log(512)) < 0.3  # the baseline is what step 1 scores


def test_no_data_trains_on_the_embedded_corpus(tmp_path):
    cache = tmp_path / "cache"
    proc = run_cmd(
        [
            *[sys.executable, "-m", "dsfm.cli", "train", *TINY, "train.max_steps=3"],
            *["eval.every=0", "checkpoint.every=0", f"train.out_dir={tmp_path / 'run'}"],
        ],
        env={"DSFM_CACHE": str(cache)},
    )
    (entry,) = cache.glob("stdlib-*")
    assert f"data: preparing the embedded corpus (stdlib) into {entry}" in proc.stdout
    assert "ln V = ln 8192" in proc.stdout  # prepare's default BPE
    assert len([r for r in read_metrics(tmp_path / "run") if "loss" in r]) == 3


def test_data_errors_are_one_line(tmp_path):
    missing = dsfm("train", "--data", str(tmp_path / "nope.txt"), check=False)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
