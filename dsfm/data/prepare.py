"""`dsfm prepare`: text files → tokenized, split, memory-mappable token streams.

Design choices:
- Inputs are files, directories, globs or the word `stdlib` (the embedded corpus in
  `corpus.py`). A directory contributes its `*.txt`, `*.md`, `*.rst` and `*.jsonl` files,
  recursively, sorted, hidden entries skipped. A `.jsonl` file holds one document per line
  under `text_key`; any other file is one UTF-8 document. The same file named twice counts
  once. Empty documents are skipped: they would only add a lone EOT.
- Every document ends with EOT, so documents can be packed back to back and the model
  learns where they end.
- The train/val split is per document, drawn from a seeded generator in corpus order, so it
  is reproducible and no document straddles both splits. The last document is held back
  until the end so that either split found empty can take it: train always gets at least
  one document, and val too when `val_fraction > 0` and there are two or more.
- Output is a flat token stream per split (`{split}.bin`, uint16 while the vocabulary fits)
  plus document start offsets (`{split}.idx`, int64, n_docs + 1 entries), the
  `tokenizer.json` that produced them and a self-describing `meta.json`. Tokens stream to
  disk in batches; only per-document offsets stay in memory.
- Atomic: everything is written to a temp dir beside `out_dir` (same filesystem) and
  renamed into place when complete. A failure leaves nothing behind, and `force=True`
  replaces an old dataset only after the new one is complete. `force` only ever replaces a
  directory that is empty or holds a `meta.json`, so a typo cannot delete unrelated files.
- `max_bytes` caps the `stdlib` corpus only; files are always read whole so their sha256 in
  `meta.json` describes what was tokenized.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import uuid
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from dsfm.data.corpus import STDLIB, stdlib_documents
from dsfm.tokenizer import TOKENIZER_FILE, Tokenizer, byte_tokenizer, train_bpe

FORMAT_VERSION = 1
META_FILE = "meta.json"
SPLITS = ("train", "val")
DIR_SUFFIXES = (".txt", ".md", ".rst", ".jsonl")
JSONL_SUFFIX = ".jsonl"
BYTE_TOKENIZER = "byte"
# Documents are encoded in batches of about this much text: large enough for the
# tokenizer's thread pool to pay off, small enough to keep memory flat.
ENCODE_BATCH_BYTES = 4 << 20
ENCODE_BATCH_DOCS = 4096
# Tokens buffered per split before a write to disk.
WRITE_BUFFER_TOKENS = 1 << 20


@dataclass(frozen=True)
class Source:
    """One input: a file on disk, or the embedded stdlib corpus (`path == "stdlib"`)."""

    path: str
    kind: str  # "text", "jsonl" or "stdlib"


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
    kind = "jsonl" if path.suffix == JSONL_SUFFIX else "text"
    return Source(str(path.resolve()), kind)


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
                f"or {STDLIB!r} for the embedded corpus"
            )
    return list(dict.fromkeys(sources))  # drop repeats, keep first-seen order


# ---------------------------------------------------------------------------------------
# Documents


class SourceStats:
    """Bytes read from one source and their sha256, for `meta.json`'s provenance."""

    def __init__(self) -> None:
        self.bytes = 0
        self.sha256 = hashlib.sha256()

    def update(self, raw: bytes) -> None:
        self.bytes += len(raw)
        self.sha256.update(raw)


def _decode_utf8(raw: bytes, where: str, start_offset: int = 0) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{where}: not valid UTF-8 at byte offset {start_offset + e.start} ({e.reason}); "
            f"convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`) or drop it from inputs"
        ) from None


def jsonl_records(path: str, stats: SourceStats) -> Iterator[tuple[object, str, int]]:
    """Yield `(record, "file:line", input bytes consumed since the last record)` per non-blank
    line; bad UTF-8 and bad JSON are errors naming the file and line."""
    n_bytes = 0  # bytes consumed since the last record, for progress
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            line_offset = stats.bytes
            stats.update(raw)
            n_bytes += len(raw)
            if not raw.strip():
                continue
            where = f"{path}:{line_number}"
            line = _decode_utf8(raw, where, line_offset)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{where}: invalid JSON ({e.msg} at column {e.colno}); "
                    f"each line of a .jsonl file must be one JSON object"
                ) from None
            yield record, where, n_bytes
            n_bytes = 0


def _jsonl_documents(path: str, text_key: str, stats: SourceStats) -> Iterator[tuple[str, int]]:
    pending = 0  # bytes of skipped empty documents, counted with the next one
    for record, where, n_bytes in jsonl_records(path, stats):
        pending += n_bytes
        if not isinstance(record, dict) or text_key not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(
                f"{where}: no {text_key!r} key (found {keys}); "
                f"set text_key to the field that holds the document text"
            )
        text = record[text_key]
        if not isinstance(text, str):
            raise ValueError(f"{where}: {text_key!r} is a {type(text).__name__}, not a string")
        if text:
            yield text, pending
            pending = 0


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
    else:
        raw = Path(source.path).read_bytes()
        stats.update(raw)
        doc = _decode_utf8(raw, source.path)
        if doc:
            yield doc, len(raw)


def _input_bytes(sources: list[Source], max_bytes: int | None) -> int | None:
    """Total input size for the progress bar; None when unknown (uncapped stdlib)."""
    total = 0
    for source in sources:
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
    """Appends documents' tokens to `{split}.bin` and records their start offsets."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype) -> None:
        self.split = split
        self.bin_path = out_dir / f"{split}.bin"
        self.idx_path = out_dir / f"{split}.idx"
        self._file: BinaryIO = open(self.bin_path, "wb")
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self.dtype = dtype
        self.offsets = array("q", [0])

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
            self._file.write(np.concatenate(self._buffer).tobytes())
        self._buffer, self._buffered = [], 0

    def close(self) -> None:
        self.flush()
        self._file.close()
        np.asarray(self.offsets, dtype=np.int64).tofile(self.idx_path)


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


def _encode_into(batch: list[str], tokenizer: Tokenizer, dtype: np.dtype, assigner) -> int:
    n_tokens = 0
    for ids in tokenizer.encode_batch(batch):
        tokens = np.empty(len(ids) + 1, dtype=dtype)
        tokens[:-1] = ids
        tokens[-1] = tokenizer.eot_id
        assigner.add(tokens)
        n_tokens += len(tokens)
    return n_tokens


def _write_splits(
    out_dir: Path,
    sources: list[Source],
    tokenizer: Tokenizer,
    text_key: str,
    max_bytes: int | None,
    val_fraction: float,
    seed: int,
    progress,
) -> tuple[dict, list[dict]]:
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {split: SplitWriter(out_dir, split, dtype) for split in SPLITS}
    assigner = SplitAssigner(writers, val_fraction, seed)
    task = progress.add_task(
        "tokenizing", total=_input_bytes(sources, max_bytes), docs=0, mb=0.0, tokens=0
    )
    try:
        source_records = _tokenize_sources(
            sources, tokenizer, text_key, max_bytes, dtype, assigner, progress, task
        )
        assigner.finish()
    finally:
        for writer in writers.values():
            writer.close()
    n_docs = sum(w.n_docs for w in writers.values())
    if n_docs == 0:
        raise ValueError(
            f"empty corpus: inputs {[s.path for s in sources]} hold no non-empty documents"
        )
    splits = {s: {"tokens": int(w.n_tokens), "docs": w.n_docs} for s, w in writers.items()}
    return splits, source_records


def _tokenize_sources(
    sources: list[Source],
    tokenizer: Tokenizer,
    text_key: str,
    max_bytes: int | None,
    dtype: np.dtype,
    assigner: SplitAssigner,
    progress,
    task,
) -> list[dict]:
    source_records = []
    batch: list[str] = []
    batch_bytes = n_docs = n_bytes = n_tokens = 0
    for source in sources:
        stats = SourceStats()
        for doc, consumed in read_documents(source, text_key, max_bytes, stats):
            batch.append(doc)
            batch_bytes += consumed
            if batch_bytes >= ENCODE_BATCH_BYTES or len(batch) >= ENCODE_BATCH_DOCS:
                n_tokens += _encode_into(batch, tokenizer, dtype, assigner)
                n_docs, n_bytes = n_docs + len(batch), n_bytes + batch_bytes
                progress.update(
                    task, advance=batch_bytes, docs=n_docs, mb=n_bytes / 1e6, tokens=n_tokens
                )
                batch, batch_bytes = [], 0
        source_records.append(
            {"path": source.path, "bytes": stats.bytes, "sha256": stats.sha256.hexdigest()}
        )
    n_tokens += _encode_into(batch, tokenizer, dtype, assigner)
    n_docs, n_bytes = n_docs + len(batch), n_bytes + batch_bytes
    progress.update(
        task, completed=n_bytes, total=n_bytes, docs=n_docs, mb=n_bytes / 1e6, tokens=n_tokens
    )
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
    tok.save(tmp_dir)
    meta = {
        "format_version": FORMAT_VERSION,
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "dtype": token_dtype(tok.vocab_size).name,
        "tokenizer": TOKENIZER_FILE,
        "splits": splits,
        "sources": sources,
        **extra,
    }
    (tmp_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


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
) -> None:
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
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenize `inputs` into `out_dir` (train/val .bin + .idx, tokenizer.json, meta.json).

    `tokenizer`: None trains a byte-level BPE of `vocab_size` on the documents; "byte" uses
    the 257-token byte tokenizer; anything else is a tokenizer.json (or its directory) to
    reuse, and `vocab_size` is then ignored. Returns the meta dict written to meta.json.
    """
    out_dir = Path(os.path.abspath(Path(out_dir).expanduser()))  # "." has no name to sit beside
    _check_args(val_fraction, vocab_size, tokenizer, text_key, max_bytes)
    _check_out_dir(out_dir, force)
    sources = resolve_inputs(inputs)
    if all(s.kind != "stdlib" and os.path.getsize(s.path) == 0 for s in sources):
        raise ValueError(f"empty corpus: every input file is empty ({[s.path for s in sources]})")
    tok = _resolve_tokenizer(tokenizer)

    with staged_dir(out_dir, force) as tmp_dir, _make_progress(progress) as bar:
        if tok is None:
            tok = _train_tokenizer(sources, text_key, max_bytes, vocab_size, bar)
        splits, source_records = _write_splits(
            tmp_dir, sources, tok, text_key, max_bytes, val_fraction, seed, bar
        )
        meta = write_meta(
            tmp_dir,
            tok,
            splits,
            source_records,
            text_key=text_key,
            val_fraction=val_fraction,
            seed=seed,
        )
    return meta
