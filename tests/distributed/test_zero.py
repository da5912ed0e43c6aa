"""Real DeepSpeed, 2 CPU ranks (gloo), launched with the `deepspeed` launcher.

fp32 throughout so the only differences between ZeRO stages are the order of
floating-point sums in gradient reduction (all-reduce vs reduce-scatter buckets).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.conftest import TINY, deepspeed_train, dsfm, read_metrics

pytestmark = pytest.mark.distributed
STEPS = 8


@pytest.fixture(scope="module")
def zero_runs(byte_data, tmp_path_factory):
    """One uninterrupted 8-step run per ZeRO stage, same seed and data."""
    root = tmp_path_factory.mktemp("zero")
    runs = {}
    for i, stage in enumerate(["zero0", "zero1", "zero2", "zero3"]):
        run_dir = root / stage
        deepspeed_train(
            stage,
            [
                *TINY,
                f"data.path={byte_data}",
                f"train.out_dir={run_dir}",
                f"train.max_steps={STEPS}",
                "eval.every=4",
                "checkpoint.every=4",
            ],
            port=29520 + i,
        )
        runs[stage] = run_dir
    return runs


def losses(run_dir):
    return np.array([r["loss"] for r in read_metrics(run_dir) if "loss" in r])


def test_zero_stages_agree(zero_runs):
    # Same math in fp32; only reduction order differs, so losses agree to ~1e-6 relative
    # per step and the drift over 8 Adam steps stays far below 1e-4.
    ref = losses(zero_runs["zero0"])
    assert len(ref) == STEPS and ref[-1] < ref[0]
    for stage in ("zero1", "zero2", "zero3"):
        np.testing.assert_allclose(losses(zero_runs[stage]), ref, rtol=1e-4, err_msg=stage)
    val = [r["val_loss"] for r in read_metrics(zero_runs["zero3"]) if "val_loss" in r]
    val0 = [r["val_loss"] for r in read_metrics(zero_runs["zero0"]) if "val_loss" in r]
    np.testing.assert_allclose(val, val0, rtol=1e-4)


def test_metrics_schema_and_run_dir(zero_runs):
    run = zero_runs["zero2"]
    rows = [r for r in read_metrics(run) if "loss" in r]  # step rows, not events (warnings)
    for key in ("step", "tokens", "loss", "lr", "grad_norm", "tok_per_s", "mfu", "elapsed_s"):
        assert key in rows[0], key
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[-1]["tokens"] == STEPS * 4 * 2 * 2 * 32  # steps x micro x accum x ranks x seq
    assert rows[0]["mfu"] is None  # no known peak on CPU
    assert all(r["grad_norm"] > 0 for r in rows)
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert all(math.isclose(r["val_ppl"], math.exp(r["val_loss"])) for r in evals)
    # LR: linear warmup over 2 steps (update k uses lr*(k+1)/2; the second is the peak),
    # then cosine from that update down to min_lr_ratio * lr, reached by the final update.
    lrs = [r["lr"] for r in rows]
    assert lrs[:2] == [3e-3 / 2, 3e-3]
    assert lrs[2] == pytest.approx(3e-3 * (0.1 + 0.9 * (1 + math.cos(math.pi / 6)) / 2))
    assert lrs[-1] == pytest.approx(3e-4) and all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    for name in ("config.yaml", "ds_config.json", "samples.jsonl", "tokenizer.json"):
        assert (run / name).is_file(), name
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text() == "final"
    assert {p.name for p in ckpts.iterdir() if p.is_dir()} == {"step_00000004", "best", "final"}
    samples = (run / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 2  # one prompt, two evals


def test_offload_runs_and_matches_zero2(zero_runs, byte_data, tmp_path):
    # DeepSpeedCPUAdam (JIT-built once, then cached) instead of torch AdamW: same algorithm.
    run_dir = tmp_path / "offload"
    deepspeed_train(
        "zero2_offload",
        [
            *TINY,
            f"data.path={byte_data}",
            f"train.out_dir={run_dir}",
            f"train.max_steps={STEPS}",
            "eval.every=0",
            "checkpoint.every=0",
        ],
        port=29530,
    )
    np.testing.assert_allclose(losses(run_dir), losses(zero_runs["zero2"]), rtol=1e-3)


@pytest.mark.parametrize("stage, port", [("zero2", 29540), ("zero3", 29545)])
def test_exact_resume(zero_runs, byte_data, tmp_path, stage, port):
    """Train 3 steps and stop; restart the same run dir to step 8: identical to uninterrupted."""
    run_dir = tmp_path / stage
    common = [
        *TINY,
        f"data.path={byte_data}",
        f"train.out_dir={run_dir}",
        f"train.max_steps={STEPS}",
        "eval.every=4",
        "checkpoint.every=4",
    ]
    deepspeed_train(stage, [*common, "train.stop_at=3"], port=port)
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000003"
    out = deepspeed_train(stage, common, port=port + 1)
    assert "resumed from" in out.stdout
    resumed = [r for r in read_metrics(run_dir) if "loss" in r]
    full = [r for r in read_metrics(zero_runs[stage]) if "loss" in r]
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(resumed[3:], full[3:]):  # fp32 on CPU: bit-identical
        assert (a["step"], a["loss"], a["lr"], a["tokens"]) == (
            b["step"],
            b["loss"],
            b["lr"],
            b["tokens"],
        )
        assert a.get("val_loss") == b.get("val_loss")


def test_generate_from_zero2_and_zero3_checkpoints(zero_runs):
    outs = {}
    for stage in ("zero2", "zero3"):
        args = [
            str(zero_runs[stage]),
            "--prompt",
            "def ",
            "--max-new-tokens",
            "20",
            "--seed",
            "3",
            "--temperature",
            "1.0",
        ]
        first, second = dsfm("generate", *args).stdout, dsfm("generate", *args).stdout
        assert first == second and first.startswith("def ")
        outs[stage] = first
    # Same training in fp32 -> same weights up to reduction order -> same seeded sample.
    assert outs["zero2"] == outs["zero3"]


def test_resume_with_a_different_model_is_refused(zero_runs, byte_data):
    out = deepspeed_train(
        "zero2",
        [
            *TINY,
            f"data.path={byte_data}",
            f"train.out_dir={zero_runs['zero2']}",
            "model.n_layers=3",
            f"train.max_steps={STEPS + 2}",
        ],
        port=29550,
        check=False,
    )
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "holds a different model" in text and "model.n_layers: checkpoint 2 vs config 3" in text
    assert (zero_runs["zero2"] / "checkpoints" / "final").is_dir()  # nothing destroyed
