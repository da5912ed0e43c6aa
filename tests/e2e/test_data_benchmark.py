"""benchmarks/data_pipeline.py runs end to end (its smallest sizes) and reports every row."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_data_benchmark_runs(tmp_path):
    """The benchmark's smallest run: every row measured, ratios against its own baseline."""
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, "benchmarks/data_pipeline.py", "--mb", "1", "--vocab", "512",
         "--steps", "2", "--rss-gb", "0.002", "--json", str(out)],
        cwd=root, check=True, capture_output=True, text=True,
    )  # fmt: skip
    result = json.loads(out.read_text())
    rows = {r["run"].split(" (")[0]: r for r in result["throughput"]}
    assert result["throughput"][0]["vs_baseline"] == 1.0
    assert all(r["mb_per_s"] > 0 and r["tokens_per_s"] > 0 for r in result["throughput"])
    assert "dsfm prepare, 2 workers" in rows
    assert 0 < result["loader"]["fetch_ms"] and 0 < result["loader"]["overhead"]
    assert result["peak_rss"][0]["peak_rss_mb"] > 10
