"""Peak memory of a training step: chunked linear+cross-entropy vs materialised logits.

    python benchmarks/loss_memory.py                  # CPU: 135M width/vocab, 2 layers
    python benchmarks/loss_memory.py --layers 12      # the full 135M config (GPU)

Each variant runs in a fresh subprocess, so peaks do not mix: on CUDA the peak is
`max_memory_allocated`; on CPU it is the process's peak RSS above its RSS after the model
and batch exist (glibc returns large frees to the OS, so RSS follows tensor memory).
`materialised` is the pre-ops training path: the full (B*T, V) logits, `.float()`, then
cross-entropy, exactly the formula GPT.forward used; `chunked` is `GPT(ids, labels=...)`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(variant: str, args: argparse.Namespace) -> float:
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.nn.functional as F

    from dsfm.model.config import ModelConfig
    from dsfm.model.gpt import GPT

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = ModelConfig(
        vocab_size=args.vocab,
        n_layers=args.layers,
        d_model=args.width,
        n_heads=args.width // 64,
        ffn_hidden=args.ffn,
        max_seq_len=args.seq_len,
        kernels="torch",
    )
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), device=device)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq_len), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    if variant == "chunked":
        loss = model(ids, labels=labels)
    else:
        logits = model(ids)
        loss = (
            F.cross_entropy(logits.float().view(-1, args.vocab), labels.view(-1), reduction="sum")
            / labels.numel()
        )
    loss.backward()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return (peak - base) / 2**20


def _rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--child", choices=["chunked", "materialised"])
    p.add_argument("--out", default="benchmarks/loss_memory.json")
    args = p.parse_args()
    if args.child:
        print(json.dumps({"peak_mib": child(args.child, args)}))
        return
    rows = {}
    for variant in ("materialised", "chunked"):
        cmd = [sys.executable, __file__, "--child", variant] + [
            f"--{k.replace('_', '-')}={v}"
            for k, v in vars(args).items()
            if k not in ("child", "out")
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows[variant] = json.loads(out.strip().splitlines()[-1])["peak_mib"]
        print(f"{variant:<13} peak step memory above model+batch: {rows[variant]:,.0f} MiB")
    saving = 1 - rows["chunked"] / rows["materialised"]
    print(f"chunked linear+cross-entropy saves {100 * saving:.0f}% of the step's peak")
    result = {"args": vars(args), "peak_mib": rows, "saving": saving}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
