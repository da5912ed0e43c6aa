"""Bytes of model states real DeepSpeed holds on this rank, per ZeRO stage (for test_plan_memory).

Run by the deepspeed launcher. For each of zero0..zero3 it builds the engine through
dsfm.train.engine.initialize, takes one step, then sums the bytes this rank holds of
- weights: the module's parameters (ZeRO-1/2: the flat buffer they view), or under
  ZeRO-3 their partitions (`ds_tensor`);
- optimizer: fp32 master partitions (`single_partition_of_fp32_groups`, ZeRO-3's
  `fp32_partitioned_groups_flat`) and Adam's exp_avg / exp_avg_sq;
- buckets: the gradient reduce buckets (`ipg_buckets`),
counting each storage once (ZeRO-3 in fp32 updates the weight partition in place, so its
master is the weights). Gradients are not measured: they do not persist after the step.
Writes <train.out_dir>/memory_rank<R>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import torch

from dsfm.cli import add_train_args
from dsfm.config.deepspeed import fill_ds_config, read_ds_config
from dsfm.config.load import load_config
from dsfm.distributed import env as dist
from dsfm.model.gpt import GPT
from dsfm.train import engine as ds_engine

STAGES = ["zero0", "zero1", "zero2", "zero3"]


def storage_bytes(tensors: list[torch.Tensor], seen: set[int]) -> int:
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        if t.numel() and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def in_backward(engine) -> dict[str, int]:
    """What exists only in backward or until the step: gradients and the reduce buckets."""
    opt = engine.optimizer
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    for key in ("grads_in_partition", "grad_partitions_flat_buffer"):
        if torch.is_tensor(getattr(opt, key, None)):
            grads.append(getattr(opt, key))
    avg = getattr(opt, "averaged_gradients", {})
    grads += [g for gs in (avg.values() if isinstance(avg, dict) else avg) for g in gs or []]
    buckets = []  # the reduce buckets: a list per dtype under ZeRO-1/2, one tensor under ZeRO-3
    for bucket in getattr(opt, "ipg_buckets", {}).values():
        held = bucket.buffer if isinstance(bucket.buffer, list) else [bucket.buffer]
        buckets += [b for b in held if b is not None]
    seen: set[int] = set()  # buckets first: with contiguous_gradients, p.grad views a bucket
    buckets_bytes = storage_bytes(buckets, seen)
    return {"grads": storage_bytes(grads, seen), "buckets": buckets_bytes}


def measure(engine) -> dict[str, int]:
    params = list(engine.module.parameters())
    if engine.zero_optimization_stage() == 3:
        params = [p.ds_tensor for p in params]
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)  # the torch AdamW behind ZeRO's wrapper
    optim = list(getattr(opt, "single_partition_of_fp32_groups", []))
    optim += list(getattr(opt, "fp32_partitioned_groups_flat", []))
    optim += [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v)]
    seen: set[int] = set()
    return {"params": storage_bytes(params, seen), "optimizer": storage_bytes(optim, seen)}


def main() -> None:
    parser = argparse.ArgumentParser()
    add_train_args(parser)
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    ds_engine.init_distributed()
    t = cfg.train
    out = {}
    for name in STAGES:
        raw = read_ds_config(Path("ds_configs") / f"{name}.json")
        # Partition every weight (the tiny model's are all below the default threshold).
        raw["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        ds = fill_ds_config(raw, cfg, dist.world_size())
        torch.manual_seed(0)
        engine = ds_engine.initialize(GPT(cfg.model), ds, cfg.optim.weight_decay)
        x = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len))
        peak = {"grads": 0, "buckets": 0}

        def record(grad: torch.Tensor, engine=engine, peak=peak) -> None:
            for key, value in in_backward(engine).items():
                peak[key] = max(peak[key], value)

        # The embedding output's gradient is the last one backward computes: by then every
        # block's grads are reduced and DeepSpeed's buckets are still allocated.
        def watch(module, inputs, output: torch.Tensor, record=record) -> None:
            output.register_hook(record)

        engine.module.embed_tokens.register_forward_hook(watch)
        for _ in range(t.grad_accum):  # the largest over a non-boundary and a boundary step
            engine.backward(engine(x, labels=x))
            record(None)
            engine.step()
        out[name] = {**measure(engine), **peak}
        del engine
        gc.collect()
    path = Path(t.out_dir) / f"memory_rank{dist.rank()}.json"
    path.write_text(json.dumps(out))


if __name__ == "__main__":
    main()
