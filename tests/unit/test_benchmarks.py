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


def test_memory_benchmark_explains_that_it_needs_a_gpu():
    proc = run_cmd([sys.executable, str(ROOT / "benchmarks" / "memory.py")], check=False)
    assert proc.returncode != 0
    assert "needs a CUDA GPU" in proc.stderr
