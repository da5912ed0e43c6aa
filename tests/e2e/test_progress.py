"""Progress off a terminal: every long command, run through a pipe as in a Slurm log, prints
plain progress lines with the elapsed time and ETA on stderr (stdout stays the result)."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import TINY, dsfm

pytestmark = pytest.mark.distributed  # the fixture trains with DeepSpeed

ETA = re.compile(r"\| elapsed \d+:\d\d:\d\d \| eta \d+:\d\d:\d\d")


def progress_lines(text: str, what: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(what)]


@pytest.fixture(scope="module")
def piped(tmp_path_factory):
    """prepare and train through a pipe (subprocess output is captured, never a tty)."""
    root = tmp_path_factory.mktemp("progress")
    prep = dsfm(
        "prepare",
        *("--input", "stdlib", "--max-bytes", "600000", "--vocab-size", "300"),
        *("--out", str(root / "data")),
    )
    run = root / "run"
    train = dsfm(
        "train",
        *TINY,
        f"data.path={root / 'data'}",
        f"train.out_dir={run}",
        "train.max_steps=4",
        "eval.every=0",
        "checkpoint.every=0",
    )
    return root, run, prep, train


def test_prepare_reports_bytes_with_eta(piped):
    _, _, prep, _ = piped
    lines = progress_lines(prep.stderr, "reading for BPE:")
    assert 3 <= len(lines) <= 12, prep.stderr  # start, each tenth: not one line per document
    assert all(re.search(r"% [\d.]+/0\.6 MB", line) for line in lines), lines
    assert all(ETA.search(line) for line in lines[1:]), lines
    tokenizing = progress_lines(prep.stderr, "tokenizing:")
    assert tokenizing[0].startswith("tokenizing:   0% 0.0/0.6 MB"), prep.stderr
    assert tokenizing[-1].startswith("tokenizing: 100% 0.6/0.6 MB"), prep.stderr
    assert ETA.search(tokenizing[-1]) and "tokens" in tokenizing[-1]
    assert "\r" not in prep.stderr and "\x1b[" not in prep.stderr  # no redraws in a log


def test_train_status_lines_carry_eta(piped):
    _, _, _, train = piped
    status = [line for line in train.stdout.splitlines() if line.startswith("step ")]
    assert [s.split(" |")[0] for s in status] == [f"step {i}/4" for i in range(1, 5)], status
    assert all(re.search(r"\| eta \d+:\d\d:\d\d$", s) for s in status[:-1]), status
    assert "eta" not in status[-1]  # done: nothing left to estimate


def test_eval_export_import_merge_show_progress(piped):
    root, run, _, _ = piped
    ev = dsfm("eval", str(run), "--data", str(root / "data"), "--batch-size", "1", "--json")
    assert json.loads(ev.stdout)["samples"] > 0  # stdout is still exactly the result
    assert progress_lines(ev.stderr, "loading ") and any(
        ETA.search(line) for line in progress_lines(ev.stderr, "scoring val:")
    ), ev.stderr

    export = dsfm("export", str(run), "--out", str(root / "hf"), "--dtype", "fp32")
    assert any(
        "reading " in line and ": done | elapsed" in line for line in export.stderr.splitlines()
    )
    writing = progress_lines(export.stderr, f"writing {root / 'hf'} (fp32): 100%")
    assert writing and ETA.search(writing[-1]), export.stderr

    imported = dsfm("import", str(root / "hf"), "--out", str(root / "imported"))
    assert progress_lines(imported.stderr, f"reading {root / 'hf'}: done | elapsed"), (
        imported.stderr
    )
    assert progress_lines(imported.stderr, f"writing {root / 'imported'}: done"), imported.stderr

    merged = dsfm("merge", str(run), "--out", str(root / "merged"))
    assert progress_lines(merged.stderr, f"writing {root / 'merged'}: done"), merged.stderr
