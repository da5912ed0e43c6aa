"""`dsfm data stats` and `dsfm data verify`: look inside a prepared dataset, and check it.

Design choices:
- Both read only `meta.json`, `tokenizer.json` and the memory-mapped shards, in chunks, so
  they run on datasets far larger than RAM.
- `stats` is for a person deciding whether the data looks right: counts, document lengths,
  tokens per character, the commonest tokens and a decoded random document. Token
  frequencies come from up to `SAMPLE_CHUNKS` evenly spaced chunks, so a billion-token split
  answers in seconds; the JSON says how many tokens were counted.
- `verify` is for a machine: every check runs on every shard and every failure is
  reported (file and offset), not just the first; it returns the list of problems, and
  the CLI exits non-zero when it is not empty. Checks: files present with the sizes
  `meta.json` implies, sha256 of every `.bin` (and of the tokenizer), token ids below the
  vocabulary, document offsets that start at 0, never decrease, end at the token count and
  close every document with EOT, and loss masks the size of their tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dsfm.data.format import (
    META_FILE,
    bin_path,
    file_sha256,
    first_out_of_vocab,
    idx_path,
    open_tokens,
    read_meta,
    read_offsets,
    shards,
)
from dsfm.data.tokenizer import Tokenizer

CHUNK_TOKENS = 1 << 22
SAMPLE_CHUNKS = 16
TOP_TOKENS = 20
SAMPLE_CHARS = 600


def _length_histogram(lengths: np.ndarray) -> list[dict]:
    """Documents per power-of-two length bucket [2^k, 2^(k+1)), in tokens (EOT included)."""
    if len(lengths) == 0:
        return []
    buckets = np.floor(np.log2(np.maximum(lengths, 1))).astype(np.int64)
    counts = np.bincount(buckets)
    return [
        {"min": 1 << k, "max": (1 << (k + 1)) - 1, "docs": int(c)}
        for k, c in enumerate(counts)
        if c
    ]


def _sampled_counts(data_dir: Path, meta: dict, split_shards: list[dict]) -> tuple[np.ndarray, int]:
    counts = np.zeros(meta["vocab_size"], dtype=np.int64)
    counted = 0
    total = sum(s["tokens"] for s in split_shards)
    for shard in split_shards:
        tokens = open_tokens(data_dir, meta, shard)
        n_chunks = max(1, round(SAMPLE_CHUNKS * shard["tokens"] / max(total, 1)))
        starts = np.linspace(0, max(0, shard["tokens"] - CHUNK_TOKENS), n_chunks).astype(np.int64)
        for start in np.unique(starts):
            chunk = np.asarray(tokens[start : start + CHUNK_TOKENS])
            counts += np.bincount(chunk, minlength=len(counts))[: len(counts)]
            counted += len(chunk)
    return counts, counted


def stats(data_dir: str | Path, seed: int = 0) -> dict[str, Any]:
    """Counts, document lengths, tokens/char, top tokens and a decoded random document."""
    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    tok = Tokenizer.load(data_dir)
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {
        "path": str(data_dir),
        "vocab_size": meta["vocab_size"],
        "dtype": meta["dtype"],
        "empty_docs_skipped": meta.get("empty_docs"),
        "splits": {},
    }
    all_tokens = sum(c["tokens"] for c in meta["splits"].values())
    all_docs = sum(c["docs"] for c in meta["splits"].values())
    if meta.get("chars"):  # EOTs are ours, not the text's
        out["tokens_per_char"] = (all_tokens - all_docs) / meta["chars"]
    for split, counts in meta["splits"].items():
        split_shards = shards(meta, split)
        lengths = np.concatenate([np.diff(read_offsets(data_dir, s)) for s in split_shards])
        info: dict[str, Any] = {
            "tokens": counts["tokens"],
            "docs": counts["docs"],
            "shards": len(split_shards),
        }
        if len(lengths):
            info["doc_tokens"] = {
                "mean": float(lengths.mean()),
                "median": float(np.median(lengths)),
                "p99": float(np.percentile(lengths, 99)),
                "max": int(lengths.max()),
            }
            info["length_histogram"] = _length_histogram(lengths)
            freq, counted = _sampled_counts(data_dir, meta, split_shards)
            top = np.argsort(-freq, kind="stable")[:TOP_TOKENS]
            info["top_tokens"] = [
                {"id": int(i), "token": tok.decode([int(i)]), "share": float(freq[i] / counted)}
                for i in top
                if freq[i]
            ]
            info["tokens_counted"] = counted
            info["sample"] = _random_document(data_dir, meta, split_shards, tok, rng)
        out["splits"][split] = info
    return out


def _random_document(data_dir, meta, split_shards, tok, rng) -> dict[str, Any]:
    shard = split_shards[int(rng.integers(len(split_shards)))]
    if not shard["docs"]:
        shard = next(s for s in split_shards if s["docs"])
    offsets = read_offsets(data_dir, shard)
    doc = int(rng.integers(shard["docs"]))
    ids = open_tokens(data_dir, meta, shard)[offsets[doc] : offsets[doc + 1]]
    text = tok.decode(ids)
    return {
        "shard": shard["name"],
        "doc": doc,
        "tokens": len(ids),
        "text": text[:SAMPLE_CHARS] + ("…" if len(text) > SAMPLE_CHARS else ""),
    }


# ---------------------------------------------------------------------------------------
# verify


def _check_ids(tokens: np.memmap, vocab_size: int, where: str) -> list[str]:
    bad = first_out_of_vocab(tokens, vocab_size)
    if bad is None:
        return []
    return [
        f"{where}: token id {bad[1]} at token offset {bad[0]} is not below the vocabulary "
        f"size {vocab_size}; the file is corrupt or was made with another tokenizer"
    ]


def _check_offsets(offsets: np.ndarray, tokens: np.memmap, shard: dict, eot: int, where: str):
    problems = []
    if len(offsets) != shard["docs"] + 1:
        return [f"{where}: {len(offsets) - 1} document offsets, {META_FILE} says {shard['docs']}"]
    if len(offsets) and offsets[0] != 0:
        problems.append(f"{where}: first document starts at {int(offsets[0])}, not 0")
    steps = np.diff(offsets)
    if (steps < 1).any():
        doc = int(np.flatnonzero(steps < 1)[0])
        problems.append(f"{where}: document {doc} has {int(steps[doc])} tokens (offsets decrease)")
    if len(offsets) and offsets[-1] != shard["tokens"]:
        problems.append(
            f"{where}: offsets end at {int(offsets[-1])}, but the shard has "
            f"{shard['tokens']} tokens"
        )
    if not problems and shard["docs"]:
        last = np.asarray(tokens[offsets[1:] - 1])
        missing = np.flatnonzero(last != eot)
        if len(missing):
            doc = int(missing[0])
            problems.append(
                f"{where}: document {doc} (token offset {int(offsets[doc])}) does not end with "
                f"EOT id {eot} ({len(missing)} documents affected)"
            )
    return problems


def verify(data_dir: str | Path) -> list[str]:
    """Every problem found in the dataset, each naming the file and where; [] when sound."""
    data_dir = Path(data_dir)
    try:
        meta = read_meta(data_dir)  # files present, sizes as meta.json says, tokenizer hash
    except (FileNotFoundError, ValueError) as e:
        return [str(e)]
    problems = []
    for split in meta["splits"]:
        for shard in shards(meta, split):
            bin_file = bin_path(data_dir, shard["name"])
            if file_sha256(bin_file) != shard["sha256"]:
                problems.append(
                    f"{bin_file}: sha256 differs from {META_FILE}; the file was modified or "
                    "corrupted after `dsfm prepare` wrote it; prepare the dataset again"
                )
            tokens = open_tokens(data_dir, meta, shard)
            problems += _check_ids(tokens, meta["vocab_size"], str(bin_file))
            problems += _check_offsets(
                read_offsets(data_dir, shard),
                tokens,
                shard,
                meta["eot_id"],
                str(idx_path(data_dir, shard["name"])),
            )
    return problems


def stats_command(data_dir: str, as_json: bool, seed: int) -> int:
    print_stats(stats(data_dir, seed=seed), as_json)
    return 0


def verify_command(data_dir: str) -> int:
    problems = verify(data_dir)
    for problem in problems:
        print(f"FAIL {problem}")
    if problems:
        print(f"{data_dir}: {len(problems)} problem(s); re-run `dsfm prepare` for this dataset")
        return 1
    print(f"{data_dir}: OK (sizes, checksums, token ids, document offsets)")
    return 0


def print_stats(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    head = f"[bold]{result['path']}[/]: vocab {result['vocab_size']:,} ({result['dtype']})"
    if "tokens_per_char" in result:
        head += f", {result['tokens_per_char']:.3f} tokens/char"
    if result.get("empty_docs_skipped"):
        head += f", {result['empty_docs_skipped']:,} empty documents skipped"
    console.print(head)
    for split, info in result["splits"].items():
        console.print(
            f"\n[bold]{split}[/]: {info['tokens']:,} tokens, {info['docs']:,} documents, "
            f"{info['shards']} shard(s)"
        )
        if "doc_tokens" not in info:
            continue
        d = info["doc_tokens"]
        console.print(
            f"document tokens: mean {d['mean']:.1f}, median {d['median']:.0f}, "
            f"p99 {d['p99']:.0f}, max {d['max']:,}"
        )
        hist = Table("doc tokens", "docs", "", box=None)
        peak = max(b["docs"] for b in info["length_histogram"])
        for b in info["length_histogram"]:
            bar = "█" * max(1, round(30 * b["docs"] / peak))
            hist.add_row(f"{b['min']:,}–{b['max']:,}", f"{b['docs']:,}", bar)
        console.print(hist)
        top = Table(
            "id",
            "token",
            "share",
            box=None,
            title=f"top tokens (of {info['tokens_counted']:,} counted)",
        )
        for t in info["top_tokens"][:10]:
            top.add_row(str(t["id"]), repr(t["token"]), f"{100 * t['share']:.2f}%")
        console.print(top)
        s = info["sample"]
        console.print(f"random document ({s['shard']} #{s['doc']}, {s['tokens']} tokens):")
        console.print(s["text"], markup=False, highlight=False)
