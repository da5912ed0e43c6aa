"""A prepared dataset on disk: the one module that names its files and reads `meta.json`.

    DIR/
      meta.json          format version, vocabulary, dtype, per split its token and document
                         counts and shards (name, counts, sha256), the tokenizer's sha256,
                         the sources read (path, bytes, sha256); chat data: loss-mask facts
      tokenizer.json     the tokenizer that produced the ids (`dsfm.data.tokenizer`), and
      tokenizer_config.json  beside it when the tokenizer is a model's (its BOS/EOS, template)
      {split}.bin        token ids back to back, uint16 below 65,536 ids, else uint32
      {split}.idx        int64 start offset of every document, n_docs + 1 entries
      {split}.mask       chat data: one uint8 per token, 1 where the loss counts
      {split}-00000.bin  ... shards of a split cut with --shard-size, in meta.json's order
      .verified.json     the `.bin` files whose sha256 matched meta.json, by size, mtime,
                         ctime and inode: `check_content`'s cache (written by prepare too)

Design choices:
- `read_meta` checks the files against `meta.json` (every shard's size, the tokenizer's
  hash, the masks) before anything trusts them, so a truncated or mixed copy fails at
  start-up naming the file, instead of mid-run. `read_meta_file` only parses, for readers
  that need a few facts of a directory that may not hold its tokens (`dsfm plan`, the
  config's resolve step).
- One format version; a dataset of another version is refused with the fix.
- Content at every training start (`check_content`): each `.bin` is hashed once per file
  version and the match cached in `.verified.json`, keyed by size, mtime, ctime and inode,
  so a later start costs a `stat` per shard, and any write to a shard (which moves its
  mtime and ctime, even when its size stays) makes the next start hash it again. A
  mismatch is one error: the first out-of-vocabulary id's file and token offset when there
  is one (it would end training in an IndexError), else "changed after prepare". Prepare
  writes the cache as it writes the files, from the hashes it streamed. A dataset directory
  that cannot be written is hashed at every start (said once per start). Every dataset of
  this format version has shard hashes; a `meta.json` edited by hand without them gets its
  ids' range checked instead, cached the same way.
- Hashes: sha256 of each file, streamed. The dataset's identity for resume checks
  (`fingerprint`) is its counts and sources plus its tokenizer's hash: cheap, and
  independent of where the files live.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dsfm.data.tokenizer import Tokenizer, tokenizer_file, tokenizer_files

FORMAT_VERSION = 2
META_FILE = "meta.json"
VERIFIED_FILE = ".verified.json"
IDS_IN_RANGE = "ids-in-range"  # the cache's mark of a shard with no hash, whose ids were read
SPLITS = ("train", "val")
MASK_DTYPE = np.dtype(np.uint8)
OFFSET_DTYPE = np.dtype(np.int64)
PREPARE_HINT = "run `dsfm prepare` to (re)create it"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 for vocabularies under 65536 ids (half the disk and page cache), else uint32."""
    return np.dtype(np.uint16 if vocab_size < 1 << 16 else np.uint32)


def bin_path(data_dir: Path, shard: str) -> Path:
    return Path(data_dir) / f"{shard}.bin"


def idx_path(data_dir: Path, shard: str) -> Path:
    return Path(data_dir) / f"{shard}.idx"


def mask_path(data_dir: Path, shard: str) -> Path:
    return Path(data_dir) / f"{shard}.mask"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}"


def shards(meta: dict[str, Any], split: str) -> list[dict[str, Any]]:
    """The split's shards in order: `{"name", "tokens", "docs", "sha256"}`."""
    return meta["splits"][split]["shards"]


def shard_samples(meta: dict[str, Any], split: str, seq_len: int) -> list[int]:
    """Training windows of `seq_len` + 1 tokens in each shard of `split` (a window never
    crosses a shard's end; consecutive windows share one token): `TokenDataset`'s length,
    known from `meta.json` alone (tests/unit/config/test_config.py checks they agree)."""
    return [max(0, (shard["tokens"] - 1) // seq_len) for shard in shards(meta, split)]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def tokenizer_digest(data_dir: str | Path) -> str:
    """sha256 of the directory's tokenizer file; with a tokenizer config beside it (the
    roles of its special tokens, its chat template), sha256 of both files' hashes."""
    files = tokenizer_files(Path(data_dir))
    if len(files) == 1:
        return file_sha256(files[0])
    return hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()


# ---------------------------------------------------------------------------------------
# Reading


def read_meta_file(data_dir: str | Path) -> dict[str, Any]:
    """`meta.json` parsed, files unchecked; FileNotFoundError/ValueError naming the fix."""
    data_dir = Path(data_dir)
    meta_path = data_dir / META_FILE
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory {data_dir} does not exist; {PREPARE_HINT}")
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{meta_path} is missing, so {data_dir} is not a prepared dataset; {PREPARE_HINT}"
        )
    try:
        meta = json.loads(meta_path.read_text())
        int(meta["vocab_size"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{meta_path} is unreadable or incomplete ({e!r}); {PREPARE_HINT}") from e
    return meta


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    """`meta.json`, after checking every file it describes is there with its size, the
    tokenizer is the one that made the ids, and chat data has its masks."""
    data_dir = Path(data_dir)
    meta = read_meta_file(data_dir)
    meta_path = data_dir / META_FILE
    try:
        version = meta["format_version"]
        dtype = np.dtype(meta["dtype"])
        splits = {split: shards(meta, split) for split in meta["splits"]}
    except (KeyError, TypeError) as e:
        raise ValueError(f"{meta_path} is unreadable or incomplete ({e!r}); {PREPARE_HINT}") from e
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{meta_path} has format_version {version}, this dsfm reads {FORMAT_VERSION}; "
            f"{PREPARE_HINT} with this version"
        )
    for split_shards in splits.values():
        for shard in split_shards:
            sizes = [
                (bin_path(data_dir, shard["name"]), shard["tokens"] * dtype.itemsize),
                (idx_path(data_dir, shard["name"]), (shard["docs"] + 1) * OFFSET_DTYPE.itemsize),
            ]
            if meta.get("loss_mask"):  # instruction data: the loss counts on marked tokens only
                sizes.append((mask_path(data_dir, shard["name"]), shard["tokens"]))
            for path, expected in sizes:
                if not path.is_file():
                    raise FileNotFoundError(f"{path} is missing; {PREPARE_HINT}")
                if path.stat().st_size != expected:
                    raise ValueError(
                        f"{path} is {path.stat().st_size} bytes but {meta_path} implies "
                        f"{expected}; the dataset is truncated or mixed from different runs, "
                        f"{PREPARE_HINT}"
                    )
    _check_tokenizer(data_dir, meta)
    return meta


def _check_tokenizer(data_dir: Path, meta: dict[str, Any]) -> None:
    """The tokenizer beside the tokens must be the one that made them."""
    path = tokenizer_file(data_dir)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; the token ids cannot be decoded, {PREPARE_HINT}"
        )
    digest, expected = tokenizer_digest(data_dir), meta["tokenizer_sha256"]
    if digest != expected:
        raise ValueError(
            f"{path} is not the tokenizer that produced {data_dir} (sha256 {digest[:12]}… vs "
            f"{expected[:12]}… in {META_FILE}); copy back the original {path.name} or "
            f"{PREPARE_HINT}"
        )


def _map(path: Path, dtype: np.dtype, n: int) -> np.ndarray:
    # An empty split (val_fraction 0) is a valid dataset, but mmap refuses empty files.
    if n == 0:
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def open_tokens(data_dir: Path, meta: dict[str, Any], shard: dict[str, Any]) -> np.ndarray:
    """A shard's token ids, memory-mapped read-only (no copy, shared by every process)."""
    return _map(bin_path(data_dir, shard["name"]), np.dtype(meta["dtype"]), shard["tokens"])


def open_mask(data_dir: Path, shard: dict[str, Any]) -> np.ndarray:
    """A chat shard's loss mask, memory-mapped read-only."""
    return _map(mask_path(data_dir, shard["name"]), MASK_DTYPE, shard["tokens"])


def read_offsets(data_dir: Path, shard: dict[str, Any]) -> np.ndarray:
    """A shard's document start offsets (n_docs + 1, the last one its token count)."""
    return np.fromfile(idx_path(data_dir, shard["name"]), dtype=OFFSET_DTYPE)


# ---------------------------------------------------------------------------------------
# Content


def first_out_of_vocab(tokens: np.ndarray, vocab_size: int) -> tuple[int, int] | None:
    """(token offset, id) of the first id >= `vocab_size`, read in chunks; None if none."""
    chunk_tokens = 1 << 22
    for start in range(0, len(tokens), chunk_tokens):
        bad = np.flatnonzero(np.asarray(tokens[start : start + chunk_tokens]) >= vocab_size)
        if len(bad):
            return start + int(bad[0]), int(tokens[start + int(bad[0])])
    return None


def _file_version(path: Path) -> list[int]:
    st = path.stat()  # a write moves mtime and ctime even when the size stays
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _read_verified(data_dir: Path) -> dict[str, Any]:
    try:
        cache = json.loads((data_dir / VERIFIED_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _write_verified(data_dir: Path, cache: dict[str, Any]) -> bool:
    """Atomically; False when the directory cannot be written (a shared read-only copy)."""
    tmp = data_dir / f"{VERIFIED_FILE}.{os.getpid()}"
    try:
        tmp.write_text(json.dumps(cache, indent=1) + "\n")
        os.replace(tmp, data_dir / VERIFIED_FILE)
    except OSError:
        tmp.unlink(missing_ok=True)
        return False
    return True


def record_verified(data_dir: Path, meta: dict[str, Any]) -> None:
    """Prepare's side: the shards just written match the hashes it streamed into `meta`."""
    cache = {
        shard["name"]: [*_file_version(bin_path(data_dir, shard["name"])), shard["sha256"]]
        for split in meta["splits"]
        for shard in shards(meta, split)
    }
    _write_verified(data_dir, cache)


def check_content(
    data_dir: str | Path, meta: dict[str, Any], say: Callable[[str], None] = print
) -> int:
    """Every `.bin` of the dataset against its sha256 in `meta.json`, skipping files whose
    match is cached and unchanged since. ValueError naming the file, the first
    out-of-vocabulary token offset (or the changed content) and the fix. Returns the bytes
    hashed (0 when every shard was cached)."""
    data_dir = Path(data_dir)
    cache = _read_verified(data_dir)
    hashed = 0
    for split in meta["splits"]:
        for shard in shards(meta, split):
            path = bin_path(data_dir, shard["name"])
            # A meta.json without a shard's hash (written by hand): its ids' range, at least.
            expected = shard.get("sha256", IDS_IN_RANGE)
            version = [*_file_version(path), expected]
            if cache.get(shard["name"]) == version:
                continue
            if expected == IDS_IN_RANGE:
                if first_out_of_vocab(open_tokens(data_dir, meta, shard), meta["vocab_size"]):
                    raise ValueError(_damage(data_dir, meta, shard))
            elif file_sha256(path) != expected:
                raise ValueError(_damage(data_dir, meta, shard))
            cache[shard["name"]], hashed = version, hashed + version[0]
    if hashed and not _write_verified(data_dir, cache):
        say(
            f"note: {data_dir} is not writable, so its verified hashes are not cached: "
            "every start hashes its token files again"
        )
    return hashed


def _damage(data_dir: Path, meta: dict[str, Any], shard: dict[str, Any]) -> str:
    path = bin_path(data_dir, shard["name"])
    fix = f"`dsfm data verify {data_dir}` lists every problem; {PREPARE_HINT}"
    bad = first_out_of_vocab(open_tokens(data_dir, meta, shard), meta["vocab_size"])
    if bad is not None:
        return (
            f"{path}: token id {bad[1]} at token offset {bad[0]} is outside the vocabulary "
            f"({meta['vocab_size']} ids): the file was damaged after prepare; {fix}"
        )
    return (
        f"{path}: its sha256 differs from {META_FILE}: the file changed after prepare (its "
        f"ids are in the vocabulary, but training would read altered data); {fix}"
    )


# ---------------------------------------------------------------------------------------
# Writing


def write_meta(
    data_dir: Path,
    tokenizer: Tokenizer,
    splits: dict[str, Any],
    sources: list[dict[str, Any]],
    **extra: Any,
) -> dict[str, Any]:
    """Save the tokenizer and `meta.json` (the fields every dataset has, plus `extra`)."""
    tokenizer.save(data_dir)
    meta = {
        "format_version": FORMAT_VERSION,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "tokenizer": tokenizer_file(data_dir).name,
        "tokenizer_sha256": tokenizer_digest(data_dir),
        "splits": splits,
        "sources": sources,
        **extra,
    }
    (data_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    record_verified(data_dir, meta)
    return meta


def is_dataset_dir(path: Path) -> bool:
    return (Path(path) / META_FILE).is_file()


# ---------------------------------------------------------------------------------------
# Identity


def fingerprint(sources: list[tuple[str, str, float]]) -> dict[str, str]:
    """Short hashes of the tokenizer and of every dataset's counts and sources (and the blend
    weights); `sources` is `DataConfig.sources()`. All sources share one tokenizer (the
    config's resolve step makes sure), so the first one's stands for all."""
    identities = []
    for name, data_path, weight in sources:
        meta = read_meta_file(data_path)
        identity = {k: meta.get(k) for k in ("splits", "sources", "vocab_size")}
        identities.append(identity if len(sources) == 1 else [name, weight, identity])
    dataset = identities[0] if len(sources) == 1 else identities
    return {
        "tokenizer": tokenizer_digest(sources[0][1])[:16],
        "dataset": hashlib.sha256(json.dumps(dataset, sort_keys=True).encode()).hexdigest()[:16],
    }
