"""The `dsfm` command end to end, in fresh processes, on the embedded corpus."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import TINY, dsfm, read_metrics


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """`dsfm prepare` (trained BPE) then `dsfm train` of a d4-size model, as a user would."""
    root = tmp_path_factory.mktemp("e2e")
    data, run = root / "data", root / "run"
    dsfm(
        "prepare",
        "--input",
        "stdlib",
        "--out",
        str(data),
        "--vocab-size",
        "2048",
        "--max-bytes",
        "3000000",
        "--val-fraction",
        "0.05",
    )
    dsfm(
        "train",
        "--config",
        "configs/smoke.yaml",
        f"data.path={data}",
        f"train.out_dir={run}",
        "model.preset=d4",
        "train.seq_len=128",
        "model.max_seq_len=128",
        "train.micro_batch_size=8",
        "train.grad_accum=1",
        "train.max_steps=80",
        "schedule.warmup_steps=10",
        "eval.every=40",
        "checkpoint.every=40",
    )
    return run


def test_loss_falls_on_real_text(trained_run):
    rows = [r for r in read_metrics(trained_run) if "loss" in r]
    start = np.mean([r["loss"] for r in rows[:3]])
    end = np.mean([r["loss"] for r in rows[-5:]])
    assert start == pytest.approx(np.log(2048), abs=0.3)  # uniform at init
    assert start - end > 1.0, (start, end)
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(vals) == 2 and vals[-1] < start - 1.0


def test_generate_cli_deterministic_and_cache_equals_no_cache(trained_run):
    args = [str(trained_run), "--prompt", "def ", "--max-new-tokens", "24"]
    sampled = [dsfm("generate", *args, "--seed", "7").stdout for _ in range(2)]
    assert sampled[0] == sampled[1] and sampled[0].startswith("def ")
    assert dsfm("generate", *args, "--seed", "8").stdout != sampled[0]
    greedy = dsfm("generate", *args, "--temperature", "0").stdout
    assert dsfm("generate", *args, "--temperature", "0", "--no-cache").stdout == greedy
    # a step tag directory works too
    tag = trained_run / "checkpoints" / "step_00000040"
    assert dsfm("generate", str(tag), "--prompt", "def ", "--max-new-tokens", "4").returncode == 0


def test_generate_warns_when_the_context_stops_it(trained_run):
    """`--max-new-tokens` beyond what the 128-token context leaves: a warning says so."""
    from dsfm.data.chat import prompt_ids
    from dsfm.data.tokenizer import Tokenizer

    prompt = "import os\nimport sys\n\n\ndef main(argv):\n    " * 8  # 15 tokens each
    n_prompt = len(prompt_ids(Tokenizer.load(trained_run), prompt, chat=False)[0])
    assert 100 < n_prompt < 128
    args = [str(trained_run), "--prompt", prompt, "--temperature", "0"]
    out = dsfm("generate", *args, "--max-new-tokens", "64")
    room = 128 - n_prompt
    warning = (
        f"warning: generation stopped at the model's 128-token context: {room} of the 64 new "
        f"tokens asked for, after a {n_prompt}-token prompt\n"
    )
    assert out.stderr.count("warning:") == 1 and warning in out.stderr, out.stderr
    assert "warning" not in dsfm("generate", *args, "--max-new-tokens", str(room)).stderr


def test_grad_accum_equals_larger_batch(byte_data, tmp_path):
    """k micro-batches of b equal one batch of k*b (fp32): same samples, same mean loss."""
    common = [
        *TINY,
        f"data.path={byte_data}",
        "train.max_steps=4",
        "eval.every=0",
        "checkpoint.every=0",
    ]
    dsfm(
        "train",
        *common,
        f"train.out_dir={tmp_path / 'a'}",
        "train.micro_batch_size=2",
        "train.grad_accum=4",
    )
    dsfm(
        "train",
        *common,
        f"train.out_dir={tmp_path / 'b'}",
        "train.micro_batch_size=8",
        "train.grad_accum=1",
    )
    a, b = ([r for r in read_metrics(tmp_path / d) if "loss" in r] for d in "ab")
    # Only the order of float sums differs (per-micro-batch means averaged vs one mean).
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in a], [r[key] for r in b], rtol=1e-5)
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]


def test_bad_config_refused_before_any_work(tmp_path):
    run = tmp_path / "run"
    out = dsfm(
        "train",
        "--config",
        "configs/smoke.yaml",
        f"train.out_dir={run}",
        "model.n_heads=5",
        "train.max_step=5",
        f"data.path={tmp_path}",
        check=False,
        timeout=60,
    )
    assert out.returncode == 2
    assert "n_heads=5 does not divide model.d_model=96" in out.stderr
    assert "unknown key train.max_step (did you mean 'max_steps'?)" in out.stderr
    assert "no meta.json there" in out.stderr
    assert not run.exists()


def test_prepare_refuses_to_overwrite(byte_data):
    out = dsfm(
        "prepare",
        "--input",
        "stdlib",
        "--out",
        str(byte_data),
        "--tokenizer",
        "byte",
        check=False,
        timeout=60,
    )
    assert out.returncode == 2 and "already exists" in out.stderr
    assert (byte_data / "meta.json").is_file()


def test_import_of_an_uncached_hub_id_offline_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = dsfm("import", "org/not-cached", "--out", str(tmp_path / "ckpt"), check=False, timeout=60)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsfm import: error: org/not-cached")
    assert str(tmp_path / "hub") in lines[0] and "huggingface-cli download" in lines[0]
    assert not (tmp_path / "ckpt").exists()
