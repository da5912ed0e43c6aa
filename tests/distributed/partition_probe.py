"""Build a model far larger than the test presets partitioned across ranks (ZeRO-3) from
train.init_from, and report host memory and the first loss (for test_partitioned_build.py).

Run by the deepspeed launcher with the training CLI's arguments. On each rank: the peak RSS
growth while the model is built and filled from `train.init_from` (read tensor by tensor),
then, with every parameter gathered, the loss of a fixed batch. Writes
<train.out_dir>/partition_rank<R>.json. (A fresh partitioned build's weights are checked by
test_zero.py: ZeRO-3's losses equal ZeRO-0's from the first step.)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
from pathlib import Path

import deepspeed
import torch

from dsfm.cli import add_train_args
from dsfm.config.resolve import resolve_configs
from dsfm.distributed.env import ensure_env, rank, world_size
from dsfm.train import build
from dsfm.train import engine as ds_engine

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def first_loss(model: torch.nn.Module, vocab: int) -> float:
    ids = torch.arange(33) * 7 % vocab  # a fixed batch, the same on every rank
    with deepspeed.zero.GatheredParameters(list(model.parameters())), torch.no_grad():
        return model(ids[None, :-1], labels=ids[None, 1:]).item()


def main() -> None:
    parser = argparse.ArgumentParser()
    add_train_args(parser)
    args = parser.parse_args()
    ensure_env()
    cfg, ds = resolve_configs(args.config, args.ds, args.overrides, world_size())
    ds_engine.init_distributed()
    report = {}

    build.seed_everything(cfg.train.seed)
    before = rss_bytes()
    model = build.build_model(cfg, ds)  # partitioned, filled from train.init_from
    report["rss_growth"] = peak_rss_bytes() - before
    report["n_params"] = ds_engine.count_params(model)
    report["init_from_loss"] = first_loss(model, cfg.model.vocab_size)
    out = Path(cfg.train.out_dir) / f"partition_rank{rank()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report))


if __name__ == "__main__":
    main()
