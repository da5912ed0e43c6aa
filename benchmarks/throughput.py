"""Training throughput and MFU: plain PyTorch baseline vs dsfm through DeepSpeed, one process.

    python benchmarks/throughput.py                       # CPU: the tiny size, < 1 min
    python benchmarks/throughput.py --sizes 135m 1.4b --seq-len 2048 --batch 8   # one GPU
    python benchmarks/throughput.py --doc-mask --doc-len 512 --compile   # + document masking

For each size it runs, side by side in this process and on the same random tokens:
  torch-eager / torch-compile   the same GPT class, torch.optim.AdamW, no DeepSpeed (the
                                baseline; bf16 autocast over fp32 weights on CUDA)
  zero{1,2,3}-{torch,triton}    dsfm's DeepSpeed engine (ds_configs/zero{N}.json, bf16 on
                                CUDA, fp32 on CPU) with model.kernels torch or triton
                                (triton only on CUDA), plus -compile variants with --compile
  ...-docmask                   with --doc-mask, each variant again with document masking
                                (model.doc_mask: FlexAttention on CUDA, dense SDPA mask on
                                CPU) on the same tokens, EOTs every --doc-len tokens on
                                average; its row adds `ratio_to_causal`, tokens/s over its
                                twin's: the measurement behind the pretraining default
                                (MFU counts causal attention's FLOPs in both rows)
and prints tokens/s, MFU (null off CUDA: no known peak), peak memory and the ratio of
tokens/s to the compiled baseline (eager where compile is skipped). Results go to JSON.

MFU = tokens/s x (6 N_non-embedding + 12 L d T) / peak (GPT.flops_per_token, dsfm.observe.metrics).
Timing excludes `--warmup` steps (compilation, allocator warm-up) and synchronises the
device around the timed steps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DSFM_DS_LOG_LEVEL", "ERROR")

import torch  # noqa: E402

from dsfm.config.deepspeed import fill_ds_config, read_ds_config  # noqa: E402
from dsfm.config.load import load_config  # noqa: E402
from dsfm.config.schema import Config  # noqa: E402
from dsfm.data.dataset import doc_positions  # noqa: E402
from dsfm.distributed import env as dist  # noqa: E402
from dsfm.gpus import peak_flops  # noqa: E402
from dsfm.model.gpt import GPT  # noqa: E402
from dsfm.observe.metrics import mfu  # noqa: E402
from dsfm.train import engine as ds_engine  # noqa: E402

# "tiny" is for CPU smoke runs; the others are dsfm presets (dsfm/model/config.py).
TINY = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.ffn_hidden=128"]


def model_overrides(size: str, vocab: int, seq_len: int) -> list[str]:
    base = TINY if size == "tiny" else [f"model.preset={size}"]
    return [*base, f"model.vocab_size={vocab}", f"model.max_seq_len={max(seq_len, 16)}"]


def make_config(size: str, args: argparse.Namespace, extra: list[str]) -> Config:
    return load_config(
        None,
        [
            *model_overrides(size, args.vocab, args.seq_len),
            f"train.seq_len={args.seq_len}",
            f"train.micro_batch_size={args.batch}",
            "train.grad_accum=1",
            f"train.max_steps={args.warmup + args.steps + 10}",
            "schedule.warmup_steps=1",
            *extra,
        ],
    )


def peak(device: torch.device) -> float | None:
    return peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None  # CPU: no per-variant peak; see rss_max_gb (whole process so far)


def time_steps(step: Callable[[], None], warmup: int, steps: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return time.perf_counter() - start


EOT = 0  # the benchmark's document separator


def batch(cfg: Config, device: torch.device, args, doc_mask: bool) -> dict[str, torch.Tensor]:
    """The model's inputs: random tokens with an EOT at each position with probability
    1/doc_len (geometric document lengths), the same for every variant; with `doc_mask`,
    their per-document positions too."""
    g = torch.Generator().manual_seed(0)
    shape = (cfg.train.micro_batch_size, cfg.train.seq_len + 1)
    tokens = torch.randint(1, cfg.model.vocab_size, shape, generator=g)
    tokens[torch.rand(shape, generator=g) < 1 / args.doc_len] = EOT
    x = tokens[:, :-1]
    out = {"input_ids": x.to(device), "labels": tokens[:, 1:].to(device)}
    if doc_mask:
        out["positions"] = doc_positions(x, EOT).to(device)
    return out


def run_plain(
    cfg: Config, device: torch.device, compile: bool, doc_mask: bool, args
) -> dict[str, Any]:
    """The baseline: the same model code, torch AdamW (fused on CUDA), no DeepSpeed."""
    torch.manual_seed(0)
    model = GPT(cfg.model).to(device).train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas, fused=device.type == "cuda"
    )
    fwd = torch.compile(model) if compile else model
    inputs = batch(cfg, device, args, doc_mask)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            loss = fwd(**inputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_peak(device)
    seconds = time_steps(step, args.warmup, args.steps, device)
    return {"seconds": seconds, "peak_mem_gb": peak_memory_gb(device)}


def run_deepspeed(
    cfg: Config,
    device: torch.device,
    stage: int,
    compile: bool,
    doc_mask: bool,
    args,
    ds_adam: bool = False,
) -> dict[str, Any]:
    """dsfm's path: fill_ds_config + engine.initialize, as the trainer does. `ds_adam`:
    DeepSpeed's FusedAdam (JIT-compiled with nvcc) instead of torch's fused AdamW."""
    ds = read_ds_config(ROOT / "ds_configs" / f"zero{stage}.json")
    if ds_adam:
        ds["optimizer"]["params"]["torch_adam"] = False
    ds = fill_ds_config(ds, cfg, world_size=1)
    torch.manual_seed(0)
    engine = ds_engine.initialize(GPT(cfg.model), ds, cfg.optim.weight_decay, compile=compile)
    inputs = batch(cfg, device, args, doc_mask)

    def step() -> None:
        loss = engine(**inputs)
        engine.backward(loss)
        engine.step()

    reset_peak(device)
    seconds = time_steps(step, args.warmup, args.steps, device)
    result = {"seconds": seconds, "peak_mem_gb": peak_memory_gb(device)}
    engine.destroy()
    return result


def variants(device: torch.device, args) -> list[tuple[str, dict[str, Any]]]:
    """(name, how to run it) in the order they run; triton only where it can run for real;
    with --doc-mask each variant's document-masked twin right after it."""
    out: list[tuple[str, dict[str, Any]]] = []

    def add(name: str, how: dict[str, Any]) -> None:
        out.append((name, {**how, "doc_mask": False}))
        if args.doc_mask:
            out.append((f"{name}-docmask", {**how, "doc_mask": True}))

    add("torch-eager", {"plain": True, "compile": False})
    if not args.no_compile:
        add("torch-compile", {"plain": True, "compile": True})
    kernel_options = ["torch"] + (["triton"] if device.type == "cuda" else [])
    compile_options = [False] + ([True] if args.compile else [])
    for stage in args.zero:
        for kernels in kernel_options:
            for comp in compile_options:
                name = f"zero{stage}-{kernels}" + ("-compile" if comp else "")
                add(name, {"plain": False, "stage": stage, "kernels": kernels, "compile": comp})
        if args.ds_adam:
            how = {"plain": False, "stage": stage, "kernels": "torch", "compile": False}
            add(f"zero{stage}-torch-dsadam", {**how, "ds_adam": True})
    return out


def bench_size(size: str, device: torch.device, args) -> list[dict[str, Any]]:
    precision = "bf16" if device.type == "cuda" else "fp32"
    rows = []
    for name, how in variants(device, args):
        kernels = how.get("kernels", "torch")
        cfg = make_config(size, args, [f"model.kernels={kernels}", f"train.precision={precision}"])
        if how["plain"]:
            result = run_plain(cfg, device, how["compile"], how["doc_mask"], args)
        else:
            result = run_deepspeed(
                cfg,
                device,
                how["stage"],
                how["compile"],
                how["doc_mask"],
                args,
                how.get("ds_adam", False),
            )
        tokens = args.steps * args.batch * args.seq_len
        tok_s = tokens / result["seconds"]
        fpt = (
            GPT(cfg.model).flops_per_token(args.seq_len) if not rows else rows[0]["flops_per_token"]
        )
        rows.append(
            {
                "size": size,
                "variant": name,
                "doc_mask": how["doc_mask"],
                "precision": precision,
                "tokens_per_s": tok_s,
                "mfu": mfu(tok_s, fpt, 1, peak(device)),
                "peak_mem_gb": result["peak_mem_gb"],
                "rss_max_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                "flops_per_token": fpt,
            }
        )
        print(f"  {size:>6} {name:<30} {tok_s:>12,.0f} tok/s", flush=True)
    by_name = {r["variant"]: r for r in rows}
    base = by_name.get("torch-compile", by_name["torch-eager"])
    for r in rows:
        r["baseline"] = base["variant"]
        r["ratio_to_baseline"] = r["tokens_per_s"] / base["tokens_per_s"]
        if r["doc_mask"]:  # > 1: document masking is faster than plain causal attention
            twin = by_name[r["variant"].removesuffix("-docmask")]
            r["ratio_to_causal"] = r["tokens_per_s"] / twin["tokens_per_s"]
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'size':>6} {'variant':<30} {'tok/s':>12} {'MFU':>7} {'peak GB':>8} {'x base':>7} "
        f"{'x causal':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        m = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        p = "n/a" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.2f}"
        c = f"{r['ratio_to_causal']:.2f}" if "ratio_to_causal" in r else ""
        print(
            f"{r['size']:>6} {r['variant']:<30} {r['tokens_per_s']:>12,.0f} {m:>7} {p:>8} "
            f"{r['ratio_to_baseline']:>7.2f} {c:>8}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--sizes",
        nargs="+",
        default=["135m"] if cuda else ["tiny"],
        help="'tiny' or dsfm presets (d12, 135m, 1.4b, ...)",
    )
    p.add_argument("--seq-len", type=int, default=1024 if cuda else 64)
    p.add_argument("--batch", type=int, default=16 if cuda else 4)
    p.add_argument("--vocab", type=int, default=32768 if cuda else 512)
    p.add_argument("--steps", type=int, default=20 if cuda else 3, help="timed steps")
    p.add_argument("--warmup", type=int, default=5 if cuda else 1, help="untimed steps first")
    p.add_argument("--zero", type=int, nargs="+", default=[1, 2, 3], choices=[0, 1, 2, 3])
    p.add_argument("--compile", action="store_true", help="also DeepSpeed + engine.compile()")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument(
        "--ds-adam",
        action="store_true",
        help="also each ZeRO stage with DeepSpeed's FusedAdam instead of torch's fused AdamW "
        "(needs nvcc: it is JIT-compiled)",
    )
    p.add_argument(
        "--doc-mask", action="store_true", help="also each variant with model.doc_mask (-docmask)"
    )
    p.add_argument(
        "--doc-len", type=int, default=512, help="mean document length (tokens) between EOTs"
    )
    p.add_argument("--out", default="benchmarks/throughput.json", help="JSON results")
    args = p.parse_args(argv)
    if args.doc_len < 1:
        p.error(f"--doc-len must be >= 1, got {args.doc_len}")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    dist.ensure_env()  # a one-process "world" for DeepSpeed
    ds_engine.init_distributed()
    device = ds_engine.device()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    rows = [r for size in args.sizes for r in bench_size(size, device, args)]
    print_table(rows)
    out = {
        "device": str(device),
        "args": vars(args),
        "versions": ds_engine.versions(),
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
