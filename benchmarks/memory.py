"""Which presets train within a small GPU's memory, emulated on a big one (GPU only).

    python benchmarks/memory.py --gpu-gb 8 --presets d12 d16 d20 d24 --seq-len 2048

Caps this process at `--gpu-gb` with `torch.cuda.set_per_process_memory_fraction`, then for
each preset tries a few DeepSpeed steps with ds_configs/zero2_offload.json, and where that
runs out of memory, zero3_offload.json with model.activation_checkpointing. Prints which
configuration fits, its tokens/s and peak memory; writes JSON. On a machine without CUDA it
exits at once: the cap and the out-of-memory behaviour only exist on a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import throughput as tp  # benchmarks/throughput.py: config, timing and DeepSpeed helpers
import torch

ATTEMPTS = [("zero2_offload", []), ("zero3_offload", ["model.activation_checkpointing=true"])]


def try_preset(preset: str, args: argparse.Namespace, device: torch.device) -> dict:
    for ds_name, extra in ATTEMPTS:
        cfg = tp.make_config(preset, args, [*extra, "train.precision=bf16"])
        ds = tp.fill_ds_config(
            tp.read_ds_config(tp.ROOT / "ds_configs" / f"{ds_name}.json"),
            cfg,
            1,
        )
        engine = None
        try:
            torch.manual_seed(0)
            engine = tp.ds_engine.initialize(tp.GPT(cfg.model), ds, cfg.optim.weight_decay)
            x, y = tp.batch(cfg, device)

            def step(engine=engine, x=x, y=y) -> None:
                loss = engine(x, labels=y)
                engine.backward(loss)
                engine.step()

            tp.reset_peak(device)
            seconds = tp.time_steps(step, args.warmup, args.steps, device)
            tok_s = args.steps * args.batch * args.seq_len / seconds
            return {
                "preset": preset,
                "fits": True,
                "ds_config": ds_name,
                "extra": extra,
                "tokens_per_s": tok_s,
                "peak_mem_gb": tp.peak_memory_gb(device),
            }
        except torch.OutOfMemoryError:
            print(f"  {preset}: out of memory with {ds_name} {extra}", flush=True)
        finally:
            if engine is not None:
                engine.destroy()
            torch.cuda.empty_cache()
    return {"preset": preset, "fits": False}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu-gb", type=float, default=8.0)
    p.add_argument("--presets", nargs="+", default=["d12", "d16", "d20", "d24", "d26"])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default="benchmarks/memory.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit(
            "benchmarks/memory.py needs a CUDA GPU (it caps GPU memory to emulate a "
            f"{args.gpu_gb:g} GB card); nothing to measure on this machine"
        )
    tp.dist.ensure_env()
    tp.ds_engine.init_distributed()
    device = tp.ds_engine.device()
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_gb * 2**30 / total), device)
    rows = [try_preset(preset, args, device) for preset in args.presets]
    for r in rows:
        if r["fits"]:
            print(
                f"{r['preset']:>5} fits with {r['ds_config']} {r['extra']}: "
                f"{r['tokens_per_s']:,.0f} tok/s, peak {r['peak_mem_gb']:.2f} GB"
            )
        else:
            print(f"{r['preset']:>5} does not fit in {args.gpu_gb:g} GB")
    fitting = [r["preset"] for r in rows if r["fits"]]
    print(f"largest preset that fits: {fitting[-1] if fitting else 'none'}")
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
