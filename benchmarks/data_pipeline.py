"""Data pipeline benchmark: prepare throughput, loader overhead, prepare's peak memory.

    python benchmarks/data_pipeline.py                    # 64 MB of real text, 8k BPE
    python benchmarks/data_pipeline.py --mb 8 --steps 3   # a quick look (CI smoke test)
    python benchmarks/data_pipeline.py --rss-gb 0.25 2    # peak RSS of prepare vs corpus size

Everything is measured in this run against baselines measured in the same run:

- Prepare throughput (MB/s, tokens/s) of `dsfm prepare` with 1 and 2 workers, end to end
  (read JSONL, tokenize, split, write, checksum), against the Hugging Face tokenizer's own
  `encode_batch` over the same documents already in memory, in one process with one thread
  (the baseline) and with its default thread pool (for reference). Each run is its own
  process, so thread pools and page caches of one do not help another.
- Loader overhead: assembling one global batch of the smoke config from the memmap (sampler
  indices → inputs and labels) against one training step of the smoke model (forward,
  backward, AdamW) on this machine.
- With `--rss-gb`: peak resident memory of the whole `dsfm prepare` process tree on
  synthetic corpora of those sizes; flat peaks mean memory does not grow with the corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_corpus(dir: Path, mb: float, n_files: int = 4) -> list[Path]:
    """Real text (the stdlib corpus), repeated to `mb` megabytes, as JSONL files."""
    from dsfm.data.corpus import stdlib_documents

    docs = list(stdlib_documents(None))
    target = int(mb * 1e6)
    files = [dir / f"part{i}.jsonl" for i in range(n_files)]
    handles = [open(f, "w") for f in files]
    written = i = 0
    while written < target:
        doc = docs[i % len(docs)]
        line = json.dumps({"text": doc}) + "\n"
        handles[i % n_files].write(line)
        written += len(line.encode())
        i += 1
    for h in handles:
        h.close()
    return files


def run_child(code: str, env: dict[str, str]) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON line last."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise RuntimeError(f"benchmark child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


BASELINE = """
import json, time, sys
from dsfm.data.tokenizer import Tokenizer
tok = Tokenizer.load({tok!r})
texts = [json.loads(l)["text"] for f in {files!r} for l in open(f, encoding="utf-8") if l.strip()]
n_bytes = sum(len(t.encode()) for t in texts)
start = time.perf_counter()
n_tokens = 0
encode = tok.hf_tokenizer.encode_batch_fast
for i in range(0, len(texts), 4096):  # HF's own batch call over every document
    n_tokens += sum(len(e.ids) for e in encode(texts[i:i + 4096], add_special_tokens=False))
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "bytes": n_bytes, "tokens": n_tokens}}))
"""

PREPARE = """
import json, time
from dsfm.data.prepare import prepare
start = time.perf_counter()
meta = prepare({files!r}, {out!r}, tokenizer={tok!r}, workers={workers}, val_fraction=0.01,
               progress=False)
seconds = time.perf_counter() - start
tokens = sum(s["tokens"] - s["docs"] for s in meta["splits"].values())  # without our EOTs
n_bytes = sum(s["bytes"] for s in meta["sources"])
print(json.dumps({{"seconds": seconds, "bytes": n_bytes, "tokens": tokens}}))
"""


def throughput(files: list[Path], tok: Path, work: Path) -> list[dict]:
    one_thread = {"TOKENIZERS_PARALLELISM": "false"}
    files = [str(f) for f in files]
    runs = [
        (
            "HF encode_batch, 1 thread (baseline)",
            BASELINE.format(tok=str(tok), files=files),
            one_thread,
        ),
        ("HF encode_batch, default threads", BASELINE.format(tok=str(tok), files=files), {}),
    ]
    for workers, env, label in [
        (1, one_thread, "dsfm prepare, 1 worker (1 thread)"),
        (1, {}, "dsfm prepare, 1 worker (tokenizer threads)"),
        (2, {}, "dsfm prepare, 2 workers"),
    ]:
        out = work / f"out-{workers}-{len(env)}"
        code = PREPARE.format(files=files, out=str(out), tok=str(tok), workers=workers)
        runs.append((label, code, env))
    rows = []
    for label, code, env in runs:
        r = run_child(code, env)
        rows.append(
            {
                "run": label,
                "seconds": r["seconds"],
                "mb_per_s": r["bytes"] / r["seconds"] / 1e6,
                "tokens_per_s": r["tokens"] / r["seconds"],
            }
        )
    for row in rows:
        row["vs_baseline"] = row["mb_per_s"] / rows[0]["mb_per_s"]
    return rows


def loader_overhead(data_dir: Path, steps: int) -> dict:
    """One global batch from the memmap vs one smoke-model training step."""
    import torch

    from dsfm.config.resolve import load_resolved
    from dsfm.data.dataset import TokenDataset
    from dsfm.data.sampler import Sampler
    from dsfm.model.gpt import GPT

    cfg = load_resolved(str(ROOT / "configs" / "smoke.yaml"), [f"data.path={data_dir}"])
    t = cfg.train
    data = TokenDataset(data_dir, "train", t.seq_len)
    global_batch = t.micro_batch_size * t.grad_accum
    sampler = Sampler(len(data), global_batch, seed=0)
    torch.manual_seed(0)
    model = GPT(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def fetch():
        indices = sampler.next_indices()
        return [
            data.inputs_and_labels(indices[k * t.micro_batch_size : (k + 1) * t.micro_batch_size])
            for k in range(t.grad_accum)
        ]

    def step(batches):
        for x, y in batches:
            model(x, labels=y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(fetch())  # warm up allocator and kernels
    fetch_s, step_s = [], []
    for _ in range(steps):
        start = time.perf_counter()
        batches = fetch()
        fetch_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        step(batches)
        step_s.append(time.perf_counter() - start)
    fetch_ms, step_ms = 1e3 * float(np.median(fetch_s)), 1e3 * float(np.median(step_s))
    return {
        "global_batch": global_batch,
        "seq_len": t.seq_len,
        "fetch_ms": fetch_ms,
        "step_ms": step_ms,
        "overhead": fetch_ms / step_ms,
    }


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants (Linux /proc)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for task in os.listdir(f"/proc/{p}/task"):
                stack += [int(c) for c in open(f"/proc/{p}/task/{task}/children").read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def prepare_peak_rss(gb: float, tok: Path, work: Path, workers: int) -> dict:
    corpus = work / f"rss-{gb}"
    corpus.mkdir()
    files = write_corpus(corpus, gb * 1000)
    out = work / f"rss-out-{gb}"
    cmd = [
        sys.executable,
        "-m",
        "dsfm.cli",
        "prepare",
        "--input",
        *map(str, files),
        "--out",
        str(out),
        "--tokenizer",
        str(tok),
        "--workers",
        str(workers),
        "--shard-size",
        "1GB",
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.2)
    if proc.returncode:
        raise RuntimeError(proc.stderr.read()[-3000:])
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in files)
    for f in files:
        f.unlink()
    meta = json.loads((out / "meta.json").read_text())
    return {
        "corpus_gb": size / 1e9,
        "workers": workers,
        "seconds": seconds,
        "mb_per_s": size / seconds / 1e6,
        "shards": sum(len(s["shards"]) for s in meta["splits"].values()),
        "peak_rss_mb": peak / 1e6,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mb", type=float, default=64, help="corpus size for the throughput runs")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--steps", type=int, default=10, help="training steps timed for the loader")
    p.add_argument("--rss-gb", type=float, nargs="*", default=[], help="corpus sizes for peak RSS")
    p.add_argument("--workers", type=int, default=2, help="workers for the RSS runs")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    from rich.console import Console
    from rich.table import Table

    from dsfm.data.corpus import stdlib_documents
    from dsfm.data.tokenizer import train_bpe

    console = Console()
    with tempfile.TemporaryDirectory(prefix="dsfm-bench-") as tmp:
        work = Path(tmp)
        tok = train_bpe(stdlib_documents(int(min(4, args.mb) * 1e6)), args.vocab)
        tok_path = tok.save(work)
        (work / "corpus").mkdir()
        files = write_corpus(work / "corpus", args.mb)
        console.print(
            f"corpus: {sum(f.stat().st_size for f in files) / 1e6:.1f} MB of JSONL, "
            f"BPE {tok.vocab_size}, {os.cpu_count()} CPUs"
        )
        rows = throughput(files, tok_path, work)
        table = Table(title="prepare throughput (same documents, same tokenizer)")
        for col in ("run", "seconds", "MB/s", "tokens/s", "vs baseline"):
            table.add_column(col, justify="left" if col == "run" else "right")
        for r in rows:
            table.add_row(
                r["run"],
                f"{r['seconds']:.2f}",
                f"{r['mb_per_s']:.2f}",
                f"{r['tokens_per_s'] / 1e6:.2f}M",
                f"{r['vs_baseline']:.2f}x",
            )
        console.print(table)

        loader = loader_overhead(work / "out-2-0", args.steps)
        console.print(
            f"loader: global batch {loader['global_batch']}x{loader['seq_len']} fetched in "
            f"{loader['fetch_ms']:.3f} ms vs a smoke training step of {loader['step_ms']:.1f} ms "
            f"= [bold]{100 * loader['overhead']:.3f}%[/] overhead"
        )
        rss = []
        for gb in args.rss_gb:
            rss.append(prepare_peak_rss(gb, tok_path, work, args.workers))
            r = rss[-1]
            console.print(
                f"prepare {r['corpus_gb']:.2f} GB with {r['workers']} workers: peak RSS "
                f"{r['peak_rss_mb']:.0f} MB (process tree), {r['mb_per_s']:.1f} MB/s, "
                f"{r['shards']} shards"
            )
    result = {"throughput": rows, "loader": loader, "peak_rss": rss, "cpus": os.cpu_count()}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
