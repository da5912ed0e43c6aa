"""`dsfm prepare`: text corpora → tokenized, split, memory-mappable token streams.

Design choices:
- Inputs are files, directories, globs, the word `stdlib` (the embedded corpus in
  `corpus.py`) or `hf:NAME[:SPLIT]` (a Hugging Face `datasets` dataset, local files or cache
  only). A directory contributes its `*.txt`, `*.md`, `*.rst`, `*.jsonl[.gz|.zst]` and
  `*.parquet` files, recursively, sorted, hidden entries skipped; a directory written by
  `datasets`' `save_to_disk` is read as that dataset. JSONL (optionally gzip/zstd
  compressed), Parquet and `datasets` rows hold one document under `text_key`; any other
  file is one UTF-8 document, read whole. The same file named twice counts once. Empty
  documents are skipped (and counted): they would only add a lone EOT.
- Streaming: documents are read one at a time and tokenized in batches of a few MB, so
  memory is bounded by the batch size and the largest single document, not the corpus.
- `workers > 1` tokenizes batches in that many processes (one tokenizer thread each) while
  this process reads, assigns splits and writes. Batches go out and come back in order,
  so the output is byte-identical whatever the worker count. `workers == 1` encodes here,
  with the tokenizer's own thread pool.
- Every document ends with EOT, so documents can be packed back to back and the model
  learns where they end.
- The train/val split is per document, drawn from a seeded generator in corpus order, so it
  is reproducible and no document straddles both splits. The last document is held back
  until the end so that either split found empty can take it: train always gets at least
  one document, and val too when `val_fraction > 0` and there are two or more.
- Output is a flat token stream per split (`{split}.bin`, uint16 while the vocabulary fits)
  plus document start offsets (`{split}.idx`, int64, n_docs + 1 entries), the
  `tokenizer.json` that produced them and a self-describing `meta.json` (counts, sha256 of
  every `.bin` and of the tokenizer, sources). With `max_shard_bytes` a split is cut at
  document boundaries into shards `{split}-00000.bin`, ... each below that size (a single
  document larger than it gets a shard of its own), listed in order in `meta.json`. Tokens
  stream to disk in batches; only per-document offsets stay in memory.
- Atomic: everything is written to a temp dir beside `out_dir` (same filesystem) and
  renamed into place when complete. A failure leaves nothing behind, and `force=True`
  replaces an old dataset only after the new one is complete. `force` only ever replaces a
  directory that is empty or holds a `meta.json`, so a typo cannot delete unrelated files.
- `max_bytes` caps the `stdlib` corpus only; files are always read whole so their sha256 in
  `meta.json` describes what was tokenized.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import sys
import uuid
from array import array
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from dsfm.data.corpus import STDLIB, stdlib_documents
from dsfm.tokenizer import TOKENIZER_FILE, Tokenizer, byte_tokenizer, train_bpe

FORMAT_VERSION = 2
META_FILE = "meta.json"
SPLITS = ("train", "val")
JSONL_SUFFIX = ".jsonl"
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIX = ".parquet"
DIR_SUFFIXES = (".txt", ".md", ".rst", *JSONL_SUFFIXES, PARQUET_SUFFIX)
HF_PREFIX = "hf:"
HF_SAVED_FILES = ("dataset_info.json", "state.json")  # what `save_to_disk` leaves in a dir
BYTE_TOKENIZER = "byte"
# Documents are encoded in batches of about this much text: large enough for the
# tokenizer's thread pool to pay off, small enough to keep memory flat.
ENCODE_BATCH_BYTES = 1 << 20
ENCODE_BATCH_DOCS = 4096
# Tokens buffered per split before a write to disk.
WRITE_BUFFER_TOKENS = 1 << 20


@dataclass(frozen=True)
class Source:
    """One input: a file on disk, or the embedded stdlib corpus (`path == "stdlib"`)."""

    path: str
    kind: str  # "text", "jsonl", "parquet", "hf" or "stdlib"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 for vocabularies under 65536 ids (half the disk and page cache), else uint32."""
    return np.dtype(np.uint16 if vocab_size < 1 << 16 else np.uint32)


# ---------------------------------------------------------------------------------------
# Inputs


def _has_glob_magic(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _files_under(dir: Path) -> list[Path]:
    relative_paths = []
    for dir_path, dir_names, file_names in os.walk(dir):
        dir_names[:] = [d for d in dir_names if not d.startswith(".")]
        rel_dir = Path(dir_path).relative_to(dir)
        relative_paths += [
            (rel_dir / f).as_posix()
            for f in file_names
            if not f.startswith(".") and f.endswith(DIR_SUFFIXES)
        ]
    return [dir / p for p in sorted(relative_paths)]


def _file_source(path: Path) -> Source:
    name = path.name
    if name.endswith(JSONL_SUFFIXES):
        kind = "jsonl"
    elif name.endswith(PARQUET_SUFFIX):
        kind = "parquet"
    else:
        kind = "text"
    return Source(str(path.resolve()), kind)


def _is_saved_hf_dataset(path: Path) -> bool:
    return all((path / f).is_file() for f in HF_SAVED_FILES) or (
        (path / "dataset_dict.json").is_file()
    )


def resolve_inputs(inputs: list[str]) -> list[Source]:
    """Expand input paths, directories, globs and `stdlib` into an ordered source list."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if not inputs:
        raise ValueError("no inputs given: pass text/JSONL files, directories, globs or 'stdlib'")
    sources: list[Source] = []
    for item in map(str, inputs):
        path = Path(item).expanduser()
        if item == STDLIB:  # the word wins over a file of that name; write ./stdlib for that
            sources.append(Source(STDLIB, "stdlib"))
        elif item.startswith(HF_PREFIX):
            sources.append(Source(item[len(HF_PREFIX) :], "hf"))
        elif path.is_dir() and _is_saved_hf_dataset(path):
            sources.append(Source(str(path.resolve()), "hf"))
        elif path.is_dir():
            files = _files_under(path)
            if not files:
                raise FileNotFoundError(
                    f"input directory {path} holds no {'/'.join(DIR_SUFFIXES)} files; "
                    f"name the files directly or use a glob to pick other kinds"
                )
            sources += [_file_source(f) for f in files]
        elif path.is_file():
            sources.append(_file_source(path))
        elif _has_glob_magic(item):
            matches = sorted(glob.glob(os.path.expanduser(item), recursive=True))
            files = [
                f for m in map(Path, matches) for f in (_files_under(m) if m.is_dir() else [m])
            ]
            if not files:
                raise FileNotFoundError(f"input glob {item!r} matched no files; check the pattern")
            sources += [_file_source(f) for f in files]
        else:
            raise FileNotFoundError(
                f"input {item!r} does not exist: pass a file, a directory, a glob, "
                f"{STDLIB!r} for the embedded corpus, or hf:NAME[:SPLIT] for a `datasets` dataset"
            )
    return list(dict.fromkeys(sources))  # drop repeats, keep first-seen order


# ---------------------------------------------------------------------------------------
# Documents


class SourceStats:
    """Bytes read from one source, their sha256 (of the decompressed text), and the empty
    documents skipped, for `meta.json`'s provenance."""

    def __init__(self) -> None:
        self.bytes = 0
        self.sha256 = hashlib.sha256()
        self.file_sha256: str | None = None  # set when the text is not the file (Parquet)
        self.empty = 0
        self.chars = 0  # of the documents kept, for tokens per character

    def update(self, raw: bytes) -> None:
        self.bytes += len(raw)
        self.sha256.update(raw)

    def record(self, source: Source) -> dict:
        return {
            "path": source.path,
            "kind": source.kind,
            "bytes": self.bytes,
            "sha256": self.file_sha256 or self.sha256.hexdigest(),
            "empty_docs": self.empty,
            "chars": self.chars,
        }


def _decode_utf8(raw: bytes, where: str, start_offset: int = 0) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{where}: not valid UTF-8 at byte offset {start_offset + e.start} ({e.reason}); "
            f"convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`) or drop it from inputs"
        ) from None


def _optional(module: str, what: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"reading {what} needs the `{module.split('.')[0]}` package: "
            f"pip install 'dsfm[{extra}]'"
        ) from None


@contextmanager
def _open_lines(path: str) -> Iterator[tuple[BinaryIO, BinaryIO]]:
    """(text stream, underlying file): the first yields decompressed lines, the second's
    position is how far into the file on disk we are (for progress)."""
    raw = open(path, "rb")
    try:
        if path.endswith(".gz"):
            yield gzip.GzipFile(fileobj=raw, mode="rb"), raw
        elif path.endswith(".zst"):
            zstd = _optional("zstandard", "zstd-compressed JSONL", "data")
            yield io.BufferedReader(zstd.ZstdDecompressor().stream_reader(raw)), raw
        else:
            yield raw, raw
    finally:
        raw.close()


def jsonl_records(path: str, stats: SourceStats) -> Iterator[tuple[object, str, int]]:
    """Yield `(record, "file:line", bytes of the file consumed since the last record)` per
    non-blank line; bad UTF-8, bad JSON and corrupt compression are errors naming the file
    and line."""
    position = 0  # in the file on disk: compressed bytes for .gz/.zst
    try:
        with _open_lines(path) as (lines, raw):
            compressed = lines is not raw
            for line_number, line_bytes in enumerate(lines, start=1):
                line_offset = stats.bytes
                stats.update(line_bytes)
                if not line_bytes.strip():
                    continue
                where = f"{path}:{line_number}"
                line = _decode_utf8(line_bytes, where, line_offset)
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(
                        f"{where}: invalid JSON ({e.msg} at column {e.colno}); "
                        f"each line of a .jsonl file must be one JSON object"
                    ) from None
                now = raw.tell() if compressed else stats.bytes
                yield record, where, now - position
                position = now
    except (EOFError, OSError) as e:
        if not path.endswith((".gz", ".zst")) or isinstance(e, FileNotFoundError):
            raise
        raise ValueError(
            f"{path}: the compressed file is truncated or corrupt after {stats.bytes:,} "
            f"decompressed bytes ({e}); re-download or re-compress it"
        ) from None
    except Exception as e:  # zstandard.ZstdError has no importable base without the package
        if type(e).__name__ != "ZstdError":
            raise
        raise ValueError(
            f"{path}: corrupt zstd data ({e}); re-download or re-compress it"
        ) from None


def _text_of(record: object, text_key: str, where: str) -> str:
    if not isinstance(record, dict) or text_key not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(
            f"{where}: no {text_key!r} key (found {keys}); "
            f"set text_key (`--text-key`) to the field that holds the document text"
        )
    text = record[text_key]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise ValueError(f"{where}: {text_key!r} is a {type(text).__name__}, not a string")
    return text


def _jsonl_documents(path: str, text_key: str, stats: SourceStats) -> Iterator[tuple[str, int]]:
    pending = 0  # bytes of skipped empty documents, counted with the next one
    for record, where, n_bytes in jsonl_records(path, stats):
        pending += n_bytes
        text = _text_of(record, text_key, where)
        if text:
            yield text, pending
            pending = 0
        else:
            stats.empty += 1


def _rows_documents(
    rows: Iterator[list], where: str, text_key: str, stats: SourceStats, row_bytes: float
) -> Iterator[tuple[str, int]]:
    """Documents from batches of column values; `row_bytes` is each row's share of the
    input size, for progress."""
    row = 0
    owed = 0.0
    for values in rows:
        for text in values:
            row += 1
            owed += row_bytes
            if text is None or text == "":
                stats.empty += 1
                continue
            if not isinstance(text, str):
                raise ValueError(
                    f"{where} row {row}: {text_key!r} is a {type(text).__name__}, not a string"
                )
            stats.bytes += len(text.encode("utf-8"))  # of the text: on disk it is compressed
            yield text, int(owed)
            owed -= int(owed)


def _parquet_documents(path: str, text_key: str, stats: SourceStats) -> Iterator[tuple[str, int]]:
    pq = _optional("pyarrow.parquet", "Parquet", "data")
    try:
        f = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
    names = f.schema_arrow.names
    if text_key not in names:
        raise ValueError(
            f"{path}: no {text_key!r} column (found {names}); set text_key (`--text-key`) "
            f"to the column that holds the document text"
        )
    stats.file_sha256 = file_sha256(Path(path))
    rows = f.metadata.num_rows
    batches = (b.column(0).to_pylist() for b in f.iter_batches(1024, columns=[text_key]))
    yield from _rows_documents(batches, path, text_key, stats, os.path.getsize(path) / max(rows, 1))


def _hf_dataset(spec: str):
    """`load_from_disk` for a saved dataset directory, else `load_dataset(NAME, split=SPLIT)`
    (local files and the cache only when HF_DATASETS_OFFLINE=1)."""
    datasets = _optional("datasets", "Hugging Face datasets", "hf")
    if Path(spec).is_dir() and _is_saved_hf_dataset(Path(spec)):
        ds = datasets.load_from_disk(spec)
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ValueError(f"{spec} holds splits {sorted(ds)}; name one as hf:{spec}:SPLIT")
            ds = ds["train"]
        return ds
    name, split = spec, "train"
    match = re.fullmatch(r"(.+):([\w.\-\[\]%:]+)", spec)
    if match and not Path(spec).exists():
        name, split = match.groups()
        if Path(name).is_dir() and _is_saved_hf_dataset(Path(name)):
            return datasets.load_from_disk(name)[split]
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as e:  # network, missing split, unknown builder: all user-fixable
        raise ValueError(
            f"hf:{spec}: could not load split {split!r} with `datasets` ({e}); check the "
            f"name and split, and that the files are local or cached"
        ) from None


def _hf_documents(spec: str, text_key: str, stats: SourceStats) -> Iterator[tuple[str, int]]:
    ds = _hf_dataset(spec)
    if text_key not in ds.column_names:
        raise ValueError(
            f"hf:{spec}: no {text_key!r} column (found {ds.column_names}); set text_key "
            f"(`--text-key`) to the column that holds the document text"
        )
    stats.file_sha256 = f"datasets-fingerprint:{getattr(ds, '_fingerprint', None)}"
    batches = (b[text_key] for b in ds.select_columns([text_key]).iter(batch_size=1024))
    yield from _rows_documents(batches, f"hf:{spec}", text_key, stats, 0.0)


def read_documents(
    source: Source, text_key: str, max_bytes: int | None, stats: SourceStats | None = None
) -> Iterator[tuple[str, int]]:
    """Yield `(document, input bytes consumed)` for one source, non-empty documents only."""
    stats = stats or SourceStats()
    if source.kind == "stdlib":
        for doc in stdlib_documents(max_bytes):
            raw = doc.encode("utf-8")
            stats.update(raw)
            yield doc, len(raw)
    elif source.kind == "jsonl":
        yield from _jsonl_documents(source.path, text_key, stats)
    elif source.kind == "parquet":
        yield from _parquet_documents(source.path, text_key, stats)
    elif source.kind == "hf":
        yield from _hf_documents(source.path, text_key, stats)
    else:
        raw = Path(source.path).read_bytes()
        stats.update(raw)
        doc = _decode_utf8(raw, source.path)
        if doc:
            yield doc, len(raw)
        else:
            stats.empty += 1


def _input_bytes(sources: list[Source], max_bytes: int | None) -> int | None:
    """Total input size for the progress bar; None when unknown (uncapped stdlib)."""
    total = 0
    for source in sources:
        if source.kind == "hf":
            return None
        if source.kind == "stdlib":
            if max_bytes is None:
                return None
            total += max_bytes
        else:
            total += os.path.getsize(source.path)
    return total


# ---------------------------------------------------------------------------------------
# Output


class SplitWriter:
    """Appends documents' tokens to `{name}.bin` and records their start offsets."""

    def __init__(self, out_dir: Path, name: str, dtype: np.dtype) -> None:
        self.name = name
        self.bin_path = out_dir / f"{name}.bin"
        self.idx_path = out_dir / f"{name}.idx"
        self._file: BinaryIO = open(self.bin_path, "wb")
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self.dtype = dtype
        self.offsets = array("q", [0])
        self.sha256 = hashlib.sha256()

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return self.offsets[-1]

    def add(self, tokens: np.ndarray) -> None:
        self._buffer.append(tokens)
        self._buffered += len(tokens)
        self.offsets.append(self.offsets[-1] + len(tokens))
        if self._buffered >= WRITE_BUFFER_TOKENS:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            data = np.concatenate(self._buffer).tobytes()
            self.sha256.update(data)
            self._file.write(data)
        self._buffer, self._buffered = [], 0

    def close(self) -> None:
        self.flush()
        self._file.close()
        np.asarray(self.offsets, dtype=np.int64).tofile(self.idx_path)

    def shard_record(self) -> dict:
        return {
            "name": self.name,
            "tokens": int(self.n_tokens),
            "docs": self.n_docs,
            "sha256": self.sha256.hexdigest(),
        }


class ShardedSplitWriter:
    """A split written as shards of at most `max_shard_bytes` each, cut between documents.

    Shards are `{split}-00000.bin`, ...; a split that fits in one is renamed `{split}.bin`
    at the end, so small datasets look as they always did.
    """

    def __init__(
        self, out_dir: Path, split: str, dtype: np.dtype, max_shard_bytes: int | None
    ) -> None:
        self.out_dir, self.split, self.dtype = out_dir, split, dtype
        self.max_tokens = max_shard_bytes // dtype.itemsize if max_shard_bytes else None
        self.shards: list[SplitWriter] = []
        self._new_shard()

    def _new_shard(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}"
        self.shards.append(SplitWriter(self.out_dir, name, self.dtype))

    @property
    def n_docs(self) -> int:
        return sum(s.n_docs for s in self.shards)

    @property
    def n_tokens(self) -> int:
        return sum(s.n_tokens for s in self.shards)

    def add(self, tokens: np.ndarray) -> None:
        shard = self.shards[-1]
        if self.max_tokens and shard.n_docs and shard.n_tokens + len(tokens) > self.max_tokens:
            shard.close()
            self._new_shard()
        self.shards[-1].add(tokens)

    def close(self) -> None:
        self.shards[-1].close()
        if len(self.shards) == 1:
            only = self.shards[0]
            for suffix in (".bin", ".idx"):
                os.rename(
                    self.out_dir / f"{only.name}{suffix}", self.out_dir / f"{self.split}{suffix}"
                )
            only.name = self.split

    def split_record(self) -> dict:
        return {
            "tokens": int(self.n_tokens),
            "docs": self.n_docs,
            "shards": [s.shard_record() for s in self.shards],
        }


class SplitAssigner:
    """Seeded per-document train/val choice, with the last document held back.

    Holding one document back until the next arrives lets `finish` give it to whichever
    split would otherwise be empty.
    """

    def __init__(self, writers: dict[str, SplitWriter], val_fraction: float, seed: int) -> None:
        self.writers = writers
        self.val_fraction = val_fraction
        self._rng = np.random.default_rng(seed)
        self._pending: tuple[np.ndarray, str] | None = None

    def add(self, tokens: np.ndarray) -> None:
        split = "val" if self._rng.random() < self.val_fraction else "train"
        if self._pending is not None:
            pending_tokens, pending_split = self._pending
            self.writers[pending_split].add(pending_tokens)
        self._pending = (tokens, split)

    def finish(self) -> None:
        if self._pending is None:
            return
        tokens, split = self._pending
        if self.writers["train"].n_docs == 0:
            split = "train"
        elif self.writers["val"].n_docs == 0 and self.val_fraction > 0:
            split = "val"
        self.writers[split].add(tokens)
        self._pending = None


def _make_progress(enabled: bool):
    from rich.progress import (
        BarColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[docs]:,} docs"),
        TextColumn("{task.fields[mb]:,.1f} MB"),
        TextColumn("{task.fields[tokens]:,} tokens"),
        TimeElapsedColumn(),
        disable=not enabled,
    )


def _train_tokenizer(
    sources: list[Source], text_key: str, max_bytes: int | None, vocab_size: int, progress
) -> Tokenizer:
    task = progress.add_task(
        "reading for BPE", total=_input_bytes(sources, max_bytes), docs=0, mb=0.0, tokens=0
    )
    n_docs = n_bytes = 0

    def texts() -> Iterator[str]:
        nonlocal n_docs, n_bytes
        for source in sources:
            for doc, consumed in read_documents(source, text_key, max_bytes):
                n_docs += 1
                n_bytes += consumed
                progress.update(task, advance=consumed, docs=n_docs, mb=n_bytes / 1e6)
                yield doc
        progress.update(task, description=f"training BPE ({vocab_size} tokens)")

    tokenizer = train_bpe(texts(), vocab_size)
    if n_docs == 0:
        raise ValueError(f"empty corpus: inputs {[s.path for s in sources]} hold no text")
    progress.update(task, description="trained BPE", completed=n_bytes, total=n_bytes)
    return tokenizer


def _encode_docs(tokenizer: Tokenizer, dtype: np.dtype, batch: list[str]) -> tuple:
    """A batch of documents as one flat token array (EOT after each) and their lengths."""
    ids = tokenizer.encode_batch(batch)
    lengths = np.fromiter((len(d) + 1 for d in ids), dtype=np.int64, count=len(ids))
    flat = np.empty(int(lengths.sum()), dtype=dtype)
    ends = np.cumsum(lengths)
    flat[ends - 1] = tokenizer.eot_id
    for doc, end, n in zip(ids, ends, lengths):
        flat[end - n : end - 1] = doc
    return flat, lengths


_worker_tokenizer: Tokenizer | None = None
_worker_dtype: np.dtype | None = None


def _init_worker(tokenizer_json: str, dtype: str) -> None:
    global _worker_tokenizer, _worker_dtype
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the processes
    import tokenizers

    _worker_tokenizer = Tokenizer(tokenizers.Tokenizer.from_str(tokenizer_json))
    _worker_dtype = np.dtype(dtype)


def _encode_in_worker(batch: list[str]) -> tuple:
    return _encode_docs(_worker_tokenizer, _worker_dtype, batch)


class BatchEncoder:
    """Encodes document batches in submission order, here or in `workers` processes.

    At most `2 * workers` batches are in flight, so a slow tokenizer never lets the reader
    run ahead and fill memory. Workers are forked on Linux: spawned ones would re-import the
    caller's `__main__`, which breaks scripts without a main guard and stdin scripts.
    TOKENIZERS_PARALLELISM=false while they live gives each one tokenizer thread (the
    parallelism is the processes) and keeps the tokenizer's fork warning quiet.
    """

    def __init__(self, tokenizer: Tokenizer, dtype: np.dtype, workers: int) -> None:
        self.tokenizer, self.dtype, self.workers = tokenizer, dtype, workers
        self.pool = None
        self.pending: deque[Future] = deque()
        self._saved_env = os.environ.get("TOKENIZERS_PARALLELISM")
        if workers > 1:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            method = "fork" if sys.platform == "linux" else "spawn"
            self.pool = ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context(method),
                initializer=_init_worker,
                initargs=(tokenizer.hf_tokenizer.to_str(), dtype.name),
            )

    def submit(self, batch: list[str]) -> Iterator[tuple]:
        """Queue `batch`; yield the results that are due, oldest first."""
        if self.pool is None:
            yield _encode_docs(self.tokenizer, self.dtype, batch)
            return
        self.pending.append(self.pool.submit(_encode_in_worker, batch))
        while len(self.pending) > 2 * self.workers:
            yield self.pending.popleft().result()

    def drain(self) -> Iterator[tuple]:
        while self.pending:
            yield self.pending.popleft().result()

    def close(self) -> None:
        if self.pool is None:
            return
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self._saved_env is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = self._saved_env


def _write_splits(
    out_dir: Path,
    sources: list[Source],
    tokenizer: Tokenizer,
    opts: dict,
    progress,
) -> tuple[dict, list[dict]]:
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {
        split: ShardedSplitWriter(out_dir, split, dtype, opts["max_shard_bytes"])
        for split in SPLITS
    }
    assigner = SplitAssigner(writers, opts["val_fraction"], opts["seed"])
    task = progress.add_task(
        "tokenizing", total=_input_bytes(sources, opts["max_bytes"]), docs=0, mb=0.0, tokens=0
    )
    encoder = BatchEncoder(tokenizer, dtype, opts["workers"])
    try:
        source_records = _tokenize_sources(sources, opts, encoder, assigner, progress, task)
        assigner.finish()
    finally:
        encoder.close()
        for writer in writers.values():
            writer.close()
    n_docs = sum(w.n_docs for w in writers.values())
    if n_docs == 0:
        raise ValueError(
            f"empty corpus: inputs {[s.path for s in sources]} hold no non-empty documents"
        )
    return {s: w.split_record() for s, w in writers.items()}, source_records


class _Progress:
    """Counts for the progress bar, advanced as encoded batches come back."""

    def __init__(self, progress, task) -> None:
        self.progress, self.task = progress, task
        self.docs = self.bytes = self.tokens = 0

    def done(self, batch_bytes: int, flat: np.ndarray, lengths: np.ndarray) -> None:
        self.docs += len(lengths)
        self.bytes += batch_bytes
        self.tokens += len(flat)
        self.progress.update(
            self.task, advance=batch_bytes, docs=self.docs, mb=self.bytes / 1e6, tokens=self.tokens
        )


def _tokenize_sources(
    sources: list[Source],
    opts: dict,
    encoder: BatchEncoder,
    assigner: SplitAssigner,
    progress,
    task,
) -> list[dict]:
    counts = _Progress(progress, task)
    batch_bytes_in_flight: deque[int] = deque()

    def take(results: Iterator[tuple]) -> None:
        for flat, lengths in results:
            start = 0
            for n in lengths.tolist():
                assigner.add(flat[start : start + n])
                start += n
            counts.done(batch_bytes_in_flight.popleft(), flat, lengths)

    source_records = []
    batch: list[str] = []
    batch_bytes = 0
    for source in sources:
        stats = SourceStats()
        for doc, consumed in read_documents(source, opts["text_key"], opts["max_bytes"], stats):
            stats.chars += len(doc)
            batch.append(doc)
            batch_bytes += consumed
            if batch_bytes >= ENCODE_BATCH_BYTES or len(batch) >= ENCODE_BATCH_DOCS:
                batch_bytes_in_flight.append(batch_bytes)
                take(encoder.submit(batch))
                batch, batch_bytes = [], 0
        source_records.append(stats.record(source))
    if batch:
        batch_bytes_in_flight.append(batch_bytes)
        take(encoder.submit(batch))
    take(encoder.drain())
    progress.update(task, completed=counts.bytes, total=counts.bytes)
    return source_records


@contextmanager
def staged_dir(out_dir: Path, force: bool) -> Iterator[Path]:
    """A temp dir beside `out_dir`, renamed into place when the block succeeds, removed if
    it fails: a dataset appears whole or not at all."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A plain mkdir (not mkdtemp) so the final directory gets the usual umask permissions.
    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp_dir.mkdir()
    try:
        yield tmp_dir
        _publish(tmp_dir, out_dir, force)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def write_meta(
    tmp_dir: Path, tok: Tokenizer, splits: dict, sources: list[dict], **extra: object
) -> dict:
    """Save the tokenizer and `meta.json` (the fields every dataset has, plus `extra`)."""
    tok_path = tok.save(tmp_dir)
    meta = {
        "format_version": FORMAT_VERSION,
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "dtype": token_dtype(tok.vocab_size).name,
        "tokenizer": TOKENIZER_FILE,
        "tokenizer_sha256": file_sha256(tok_path),
        "splits": splits,
        "sources": sources,
        **extra,
    }
    (tmp_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _publish(tmp_dir: Path, out_dir: Path, force: bool) -> None:
    """Rename the finished `tmp_dir` to `out_dir`, replacing an old dataset if forced."""
    if not (out_dir.exists() or out_dir.is_symlink()):
        os.rename(tmp_dir, out_dir)
        return
    _check_out_dir(out_dir, force)  # it may have appeared while we worked
    old_dir = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out_dir, old_dir)
    try:
        os.rename(tmp_dir, out_dir)
    except BaseException:
        os.rename(old_dir, out_dir)
        raise
    shutil.rmtree(old_dir)


# ---------------------------------------------------------------------------------------
# Entry point


def _check_out_dir(out_dir: Path, force: bool) -> None:
    if not (out_dir.exists() or out_dir.is_symlink()):
        return
    if not force:
        raise FileExistsError(
            f"{out_dir} already exists; pass force=True (`--force`) to replace it, "
            f"or choose another output directory"
        )
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise FileExistsError(
            f"{out_dir} exists and is a file or symlink, not a dataset directory; "
            f"remove it yourself or pick another path"
        )
    if any(out_dir.iterdir()) and not (out_dir / META_FILE).is_file():
        raise FileExistsError(
            f"refusing to replace {out_dir}: it is not empty and has no {META_FILE}, so it "
            f"does not look like a prepared dataset; remove it yourself or pick another path"
        )


def _check_args(
    val_fraction: float,
    vocab_size: int,
    tokenizer: str | None,
    text_key: str,
    max_bytes: int | None,
    workers: int,
    max_shard_bytes: int | None,
) -> None:
    if not (isinstance(workers, int) and workers >= 1):
        raise ValueError(f"workers={workers!r} must be a positive integer (processes to tokenize)")
    if max_shard_bytes is not None and not (
        isinstance(max_shard_bytes, int) and max_shard_bytes > 0
    ):
        raise ValueError(
            f"max_shard_bytes={max_shard_bytes!r} must be a positive number of bytes "
            f"(e.g. 1GB), or unset for one file per split"
        )
    if not (isinstance(val_fraction, (int, float)) and 0 <= val_fraction < 1):
        raise ValueError(
            f"val_fraction={val_fraction!r} must be in [0, 1), e.g. 0.01 for 1% of documents "
            f"(0 for no validation split)"
        )
    if tokenizer is None and vocab_size < 257:
        raise ValueError(
            f"vocab_size={vocab_size} is too small to train a byte-level BPE (minimum 257: "
            f"256 bytes + EOT); use tokenizer='byte' for a pure byte vocabulary"
        )
    if not text_key:
        raise ValueError("text_key must name the JSONL field that holds document text")
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes={max_bytes} must be positive, or None for no cap")


def _resolve_tokenizer(tokenizer: str | None) -> Tokenizer | None:
    """None means: train one on the corpus once it has been read."""
    if tokenizer is None:
        return None
    if tokenizer == BYTE_TOKENIZER:
        return byte_tokenizer()
    return Tokenizer.load(tokenizer)


def prepare(
    inputs: list[str],
    out_dir: str | Path,
    *,
    tokenizer: str | None = None,
    vocab_size: int = 8192,
    text_key: str = "text",
    val_fraction: float = 0.01,
    seed: int = 1337,
    max_bytes: int | None = None,
    workers: int = 1,
    max_shard_bytes: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenize `inputs` into `out_dir` (train/val .bin + .idx, tokenizer.json, meta.json).

    `tokenizer`: None trains a byte-level BPE of `vocab_size` on the documents; "byte" uses
    the 257-token byte tokenizer; anything else is a tokenizer.json (or its directory) to
    reuse, and `vocab_size` is then ignored. `workers` processes tokenize in parallel
    (output identical for any count); `max_shard_bytes` cuts each split into shards.
    Returns the meta dict written to meta.json.
    """
    out_dir = Path(os.path.abspath(Path(out_dir).expanduser()))  # "." has no name to sit beside
    _check_args(val_fraction, vocab_size, tokenizer, text_key, max_bytes, workers, max_shard_bytes)
    _check_out_dir(out_dir, force)
    sources = resolve_inputs(inputs)
    if all(s.kind not in ("stdlib", "hf") and os.path.getsize(s.path) == 0 for s in sources):
        raise ValueError(f"empty corpus: every input file is empty ({[s.path for s in sources]})")
    tok = _resolve_tokenizer(tokenizer)

    with staged_dir(out_dir, force) as tmp_dir, _make_progress(progress) as bar:
        if tok is None:
            tok = _train_tokenizer(sources, text_key, max_bytes, vocab_size, bar)
        opts = dict(
            text_key=text_key,
            max_bytes=max_bytes,
            val_fraction=val_fraction,
            seed=seed,
            workers=workers,
            max_shard_bytes=max_shard_bytes,
        )
        splits, source_records = _write_splits(tmp_dir, sources, tok, opts, bar)
        meta = write_meta(
            tmp_dir,
            tok,
            splits,
            source_records,
            text_key=text_key,
            val_fraction=val_fraction,
            seed=seed,
            empty_docs=sum(r["empty_docs"] for r in source_records),
            chars=sum(r["chars"] for r in source_records),
        )
    return meta
