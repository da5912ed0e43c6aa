"""The inputs of `dsfm prepare`: which files a command line names, and the documents in them.

Design choices:
- Inputs are files, directories, globs, the word `stdlib` (the embedded corpus in
  `corpus.py`) or `hf:NAME[:SPLIT]` (a Hugging Face `datasets` dataset, local files or cache
  only). A directory contributes its `*.txt`, `*.md`, `*.rst`, `*.jsonl[.gz|.zst]` and
  `*.parquet` files, recursively, sorted, hidden entries skipped; a directory written by
  `datasets`' `save_to_disk` is read as that dataset. The same file named twice counts once.
- JSONL (optionally gzip/zstd compressed), Parquet and `datasets` rows hold one document
  under `text_key`. Any other file is UTF-8 text: one document, or one per
  `doc_separator` (e.g. `<|endoftext|>`, as TinyStories' files), read in chunks of
  `TEXT_PART_BYTES`. Empty documents (blank, for text) are skipped and counted: they
  would only add a lone EOT. `.npy`/`.bin` token arrays are read by `token_arrays.py`, not here.
- Pieces are yielded one at a time as `(text, input bytes consumed, end)`: a document, or
  a part of one (`end` False until its last part) when a text document is longer than a
  part, cut after a line end. So memory is bounded by a part (or the largest JSONL/Parquet
  document), not by a file, and the bytes feed progress bars with an ETA.
- Bad input (invalid UTF-8, bad JSON, a missing text field, a truncated archive) is an
  error naming the file and the line or offset.
- `SourceStats` records what was read (bytes, sha256 of the text, empty documents,
  characters) for `meta.json`'s provenance.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from dsfm.data.corpus import STDLIB, stdlib_documents
from dsfm.data.format import file_sha256

JSONL_SUFFIX = ".jsonl"
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIX = ".parquet"
TOKEN_SUFFIXES = (".npy", ".bin")  # token arrays (nanoGPT, CS336): named, never picked from dirs
TEXT_PART_BYTES = 1 << 20
DIR_SUFFIXES = (".txt", ".md", ".rst", *JSONL_SUFFIXES, PARQUET_SUFFIX)
HF_PREFIX = "hf:"
HF_SAVED_FILES = ("dataset_info.json", "state.json")  # what `save_to_disk` leaves in a dir


@dataclass(frozen=True)
class Source:
    """One input: a file on disk, or the embedded stdlib corpus (`path == "stdlib"`)."""

    path: str
    kind: str  # "text", "jsonl", "parquet", "tokens", "hf" or "stdlib"


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
    elif name.endswith(TOKEN_SUFFIXES):
        kind = "tokens"
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


def _part_end(buf: bytes, limit: int) -> int:
    """Where a part of a long document ends: after the last line end before `limit`, else
    at the last UTF-8 character boundary before it."""
    newline = buf.rfind(b"\n", 0, limit)
    if newline >= 0:
        return newline + 1
    cut = limit
    while limit - 4 < cut < len(buf) and buf[cut] & 0xC0 == 0x80:  # inside a character
        cut -= 1
    return cut


def _text_documents(
    path: str, separator: str | None, stats: SourceStats
) -> Iterator[tuple[str, int, bool]]:
    """A UTF-8 file read in chunks, as documents split at `separator` (none: one document),
    each yielded whole or, when longer than a part, in parts."""
    sep = separator.encode("utf-8") if separator else None
    keep = len(sep) - 1 if sep else 0  # a separator may straddle two chunks
    buf, offset = b"", 0  # offset: of buf[0] in the file
    owed = 0  # bytes read but not yet reported
    open_doc = False  # parts of the current document were yielded

    def piece(data: bytes, at: int, end: bool) -> Iterator[tuple[str, int, bool]]:
        nonlocal owed, open_doc
        text = _decode_utf8(data, path, at)
        if end and not open_doc and not text.strip():  # blank between separators
            stats.empty += 1
            return
        yield text, owed, end
        owed, open_doc = 0, not end

    with open(path, "rb") as f:
        while True:
            chunk = f.read(TEXT_PART_BYTES)
            stats.update(chunk)
            owed += len(chunk)
            buf += chunk
            start = 0
            while sep and (i := buf.find(sep, start)) >= 0:
                yield from piece(buf[start:i], offset + start, True)
                start = i + len(sep)
            buf, offset = buf[start:], offset + start
            if not chunk:
                break
            if len(buf) > TEXT_PART_BYTES:
                cut = _part_end(buf, len(buf) - keep)
                yield from piece(buf[:cut], offset, False)
                buf, offset = buf[cut:], offset + cut
    yield from piece(buf, offset, True)


def read_documents(
    source: Source,
    text_key: str,
    max_bytes: int | None,
    stats: SourceStats | None = None,
    doc_separator: str | None = None,
) -> Iterator[tuple[str, int, bool]]:
    """Yield `(text, input bytes consumed, end)` for one source: non-empty documents, or
    parts of a long text document (`end` False until its last part)."""
    stats = stats or SourceStats()
    if source.kind == "text":
        yield from _text_documents(source.path, doc_separator, stats)
        return
    if source.kind == "stdlib":
        docs = _stdlib_documents(max_bytes, stats)
    elif source.kind == "jsonl":
        docs = _jsonl_documents(source.path, text_key, stats)
    elif source.kind == "parquet":
        docs = _parquet_documents(source.path, text_key, stats)
    elif source.kind == "hf":
        docs = _hf_documents(source.path, text_key, stats)
    else:
        raise ValueError(f"{source.path}: a {source.kind} source holds no text documents")
    for doc, consumed in docs:
        yield doc, consumed, True


def _stdlib_documents(max_bytes: int | None, stats: SourceStats) -> Iterator[tuple[str, int]]:
    for doc in stdlib_documents(max_bytes):
        raw = doc.encode("utf-8")
        stats.update(raw)
        yield doc, len(raw)


def input_bytes(sources: list[Source], max_bytes: int | None) -> int | None:
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
