"""`dsfm prepare` on the files people have, end to end: one text file, a separated text
file, token arrays; and what `data`, `train` and `eval` do with an empty val split."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import TINY, dsfm, read_metrics


def play(n_lines: int) -> str:
    rng = np.random.default_rng(0)
    words = "king queen lord shall thou thee night day love sword crown good".split()
    return "".join(" ".join(rng.choice(words, rng.integers(3, 12))) + "\n" for _ in range(n_lines))


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    """One plain-text file, prepared with the defaults (val 1%) and with --val-fraction 0."""
    root = tmp_path_factory.mktemp("one_file")
    (root / "input.txt").write_text(play(6000))
    runs = {}
    for name, extra in (("shk", []), ("noval", ["--val-fraction", "0"])):
        args = ["--input", str(root / "input.txt"), "--out", str(root / name)]
        runs[name] = dsfm("prepare", *args, "--tokenizer", "byte", *extra)
    return root, runs


def test_one_file_gets_a_val_split_and_verifies(shakespeare):
    root, runs = shakespeare
    out = runs["shk"].stdout
    assert "val 0 tokens" not in out
    assert "whole documents could not make up --val-fraction 0.01" in out
    assert dsfm("data", "verify", str(root / "shk")).returncode == 0


def test_empty_val_split_is_explained_and_opens(shakespeare):
    root, runs = shakespeare
    assert "val is empty (--val-fraction 0)" in runs["noval"].stdout
    verified = dsfm("data", "verify", str(root / "noval"))
    assert "OK" in verified.stdout
    assert "val: 0 tokens" in dsfm("data", "stats", str(root / "noval")).stdout


def test_train_says_validation_is_off_and_eval_refuses_the_empty_split(shakespeare):
    root, _ = shakespeare
    run = root / "run"
    train = dsfm(
        "train",
        *TINY,
        f"data.path={root / 'noval'}",
        f"train.out_dir={run}",
        "train.max_steps=4",
        "eval.every=2",
        "eval.patience=2",
        "checkpoint.every=0",
    )
    said = train.stdout + train.stderr
    assert "validation, the best checkpoint and early stopping (eval.patience) are off" in said
    assert not any("val_loss" in r for r in read_metrics(run))
    ok = dsfm("eval", str(run), "--data", str(root / "shk"), "--split", "val", "--json")
    assert '"split": "val"' in ok.stdout
    bad = dsfm("eval", str(run), "--data", str(root / "noval"), "--split", "val", check=False)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "is empty (prepared with --val-fraction 0)" in bad.stderr


def test_doc_separator_and_token_arrays_from_the_command_line(shakespeare, tmp_path):
    root, _ = shakespeare
    stories = [f"Story {i}. The cat sat.\n" for i in range(100)]
    (tmp_path / "tiny.txt").write_text("<|endoftext|>".join(stories))
    sep = dsfm(
        "prepare",
        *("--input", str(tmp_path / "tiny.txt"), "--out", str(tmp_path / "sep")),
        *("--tokenizer", "byte", "--doc-separator", "<|endoftext|>", "--val-fraction", "0.1"),
    )
    assert " / 100 docs" not in sep.stdout and "docs, val" in sep.stdout
    ids = np.fromfile(root / "shk" / "train.bin", dtype=np.uint16)
    ids.astype(np.uint32).tofile(tmp_path / "tokens.bin")
    args = ["--input", str(tmp_path / "tokens.bin"), "--tokenizer", str(root / "shk")]
    refused = dsfm("prepare", *args, "--out", str(tmp_path / "a"), check=False)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "pass --dtype uint16 (nanoGPT's files) or --dtype uint32" in refused.stderr
    made = dsfm("prepare", *args, "--out", str(tmp_path / "b"), "--dtype", "uint32")
    assert "train " in made.stdout
    assert dsfm("data", "verify", str(tmp_path / "b")).returncode == 0
    missing = dsfm("prepare", "--input", str(tmp_path / "tokens.bin"), "--out", "x", check=False)
    assert missing.returncode == 2 and "need --tokenizer" in missing.stderr
