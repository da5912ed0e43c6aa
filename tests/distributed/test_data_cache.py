"""Two real DeepSpeed ranks given raw text: local rank 0 prepares the cached dataset, rank 1
waits for it, both train on the same data; no rank sees half a dataset."""

from __future__ import annotations

import json

from dsfm.data.corpus import stdlib_documents
from tests.conftest import TINY, deepspeed_train, read_metrics


def test_two_ranks_one_preparation(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w") as f:
        for doc in stdlib_documents(300_000):
            f.write(json.dumps({"text": doc}) + "\n")
    run = tmp_path / "run"
    args = ["--data", str(corpus), *TINY, "model.vocab_size=300", f"train.out_dir={run}"]
    proc = deepspeed_train(
        "zero2", [*args, "train.max_steps=3", "eval.every=3", "checkpoint.every=0"], port=29820
    )
    (entry,) = (run / "data").glob("corpus-*")
    # Only the preparer (local rank 0) speaks: a second line would be rank 1 preparing too.
    assert [x for x in proc.stdout.splitlines() if "data: " in x] == [
        f"data: preparing {corpus} into {entry} (a BPE of 300 tokens trained on it; done once)"
    ]
    assert not [p for p in (run / "data").iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3] and "val_loss" in rows[-1]
