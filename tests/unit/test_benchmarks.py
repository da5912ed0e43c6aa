"""CPU smoke tests of benchmarks/: they run end to end and write what they promise."""

from __future__ import annotations

import json
import sys

from tests.conftest import ROOT, run_cmd


def test_throughput_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "throughput.json"
    # The torch.compile baseline is skipped: inductor's first CPU compile alone takes ~30 s.
    run_cmd(
        [
            sys.executable,
            "benchmarks/throughput.py",
            "--no-compile",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--out",
            str(out),
        ],
        timeout=300,
    )
    report = json.loads(out.read_text())
    rows = {r["variant"]: r for r in report["results"]}
    assert list(rows) == ["torch-eager", "zero1-torch", "zero2-torch", "zero3-torch"]
    for r in rows.values():
        assert r["tokens_per_s"] > 0
        assert r["mfu"] is None  # no known peak FLOP/s on CPU: null, never a made-up number
        assert r["baseline"] == "torch-eager"
        assert r["flops_per_token"] > 0
    assert rows["torch-eager"]["ratio_to_baseline"] == 1.0


def test_throughput_benchmark_measures_doc_mask_against_causal(tmp_path):
    out = tmp_path / "throughput.json"
    run_cmd(
        [
            sys.executable,
            "benchmarks/throughput.py",
            *("--no-compile", "--doc-mask", "--doc-len", "16", "--zero", "1"),
            *("--steps", "1", "--warmup", "0", "--out", str(out)),
        ],
        timeout=300,
    )
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert list(rows) == [
        "torch-eager",
        "torch-eager-docmask",
        "zero1-torch",
        "zero1-torch-docmask",
    ]
    for name, r in rows.items():
        masked = name.endswith("-docmask")
        assert r["doc_mask"] is masked
        if masked:  # tokens/s over the causal twin's: the pretraining default's evidence
            twin = rows[name.removesuffix("-docmask")]
            assert r["ratio_to_causal"] == r["tokens_per_s"] / twin["tokens_per_s"]
        else:
            assert "ratio_to_causal" not in r


def test_memory_benchmark_explains_that_it_needs_a_gpu():
    proc = run_cmd([sys.executable, str(ROOT / "benchmarks" / "memory.py")], check=False)
    assert proc.returncode != 0
    assert "needs a CUDA GPU" in proc.stderr
