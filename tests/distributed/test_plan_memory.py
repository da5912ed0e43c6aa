"""`dsfm plan`'s memory terms against the bytes real DeepSpeed holds per rank.

Two CPU ranks (gloo) run tests/distributed/plan_memory_probe.py, which builds the tiny
model's engine for ZeRO 0-3 through dsfm.train.engine.initialize, takes one optimizer step of two
micro-batches and sums what each rank holds: weights (ZeRO-3: partitions) and optimizer
states (fp32 master + Adam) after the step; the most gradient bytes and reduce-bucket
bytes seen during backward (they are freed or reused after it). fp32 on CPU: the estimate
is 4 B/param weights, 4 grads, 8 Adam, and 4 of fp32 master under ZeRO.
"""

from __future__ import annotations

import json

import pytest

from dsfm.config.deepspeed import read_ds_config
from dsfm.config.load import load_config
from dsfm.model.sizes import num_params
from dsfm.plan import bucket_bytes, model_state_bytes
from tests.conftest import ROOT, TINY, deepspeed_train

pytestmark = pytest.mark.distributed
# Flat ZeRO buffers are padded for alignment and Adam keeps a step counter per group:
# about 100 bytes on 0.25-1 MB, so 2% is slack, not a fudge. The buckets are exact.
TOLERANCE = 0.02


def test_memory_terms_match_deepspeed(tmp_path):
    overrides = [*TINY, "model.vocab_size=257", f"train.out_dir={tmp_path}"]
    deepspeed_train(
        "zero0", overrides, port=29561, launcher="tests/distributed/plan_memory_probe.py"
    )
    n_params = num_params(load_config(None, overrides).model)
    for rank in (0, 1):
        measured = json.loads((tmp_path / f"memory_rank{rank}.json").read_text())
        for stage in range(4):
            got = measured[f"zero{stage}"]
            want = model_state_bytes(n_params, "fp32", stage, n_gpus=2)
            for key in ("params", "grads", "optimizer"):
                assert got[key] == pytest.approx(want[key], rel=TOLERANCE), (rank, stage, key)
            zero = read_ds_config(ROOT / "ds_configs" / f"zero{stage}.json")["zero_optimization"]
            assert got["buckets"] == bucket_bytes(zero, stage, "fp32"), (rank, stage)
