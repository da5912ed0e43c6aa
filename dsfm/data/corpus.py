"""The embedded default corpus: the running Python's own standard library.

Design choices:
- Every machine that runs dsfm has it, so smoke runs and tests need no download.
- English prose first (the pydoc topic help, one document per topic), then the stdlib's
  `.py` sources, one document per file: a mix of language and code in a few tens of MB.
- Deterministic for a given Python build: topics sorted by key, files by relative path.
  Tests, vendored third-party code (`site-packages`) and IDLE are skipped; so are files
  that are not valid UTF-8, because the data pipeline's documents are text.
- `max_bytes` is a hard cap on the UTF-8 bytes yielded: the document that crosses it is
  cut at a character boundary, so a small cap gives a small corpus however long the
  next document is.
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

STDLIB = "stdlib"
SKIPPED_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "dist-packages"})


def stdlib_source_files() -> list[Path]:
    """The stdlib's `.py` files, sorted by path relative to the stdlib root."""
    root = Path(sysconfig.get_paths()["stdlib"])
    relative_paths = []
    for dir_path, dir_names, file_names in os.walk(root):
        dir_names[:] = [d for d in dir_names if d not in SKIPPED_DIRS and d != "__pycache__"]
        rel_dir = Path(dir_path).relative_to(root)
        relative_paths += [(rel_dir / f).as_posix() for f in file_names if f.endswith(".py")]
    return [root / p for p in sorted(relative_paths)]


def _unbounded_documents() -> Iterator[str]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]
    for path in stdlib_source_files():
        try:
            yield path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def stdlib_documents(max_bytes: int | None = None) -> Iterator[str]:
    """Deterministic non-empty documents from the stdlib, at most `max_bytes` of UTF-8."""
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes}")
    budget = max_bytes
    for doc in _unbounded_documents():
        if not doc:
            continue
        if budget is None:
            yield doc
            continue
        raw = doc.encode("utf-8")
        if len(raw) >= budget:
            # Cut at a character boundary: "ignore" drops a partial trailing character.
            last = raw[:budget].decode("utf-8", errors="ignore")
            if last:
                yield last
            return
        budget -= len(raw)
        yield doc
