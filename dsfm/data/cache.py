"""Raw text to a prepared dataset, prepared once and reused: `dsfm train --data FILE`, and a
run given no data at all (the embedded corpus).

A cache entry is a prepared dataset directory (`prepare.prepare`, tokenizer trained on the
inputs) named for what was asked: `ROOT/<first input's stem>-<key>`, the key hashing the
inputs as absolute paths and the vocabulary size. Before an entry is used it is checked
against the inputs (`stale`): the same files (a directory or glob that gained or lost one
is changed), none modified after the entry was written (make's rule: size and content are
not re-read, so a touched file is prepared again), and a dataset that passes
`format.read_meta`'s checks. A stale entry is prepared again and replaces the old one only
when complete (`atomic`, via prepare's `force`).

Several processes, one preparer: data/ knows no ranks, so the caller says who prepares
(`prepare_here`: local rank 0 of each node, so node-local caches work too). The preparer
takes an exclusive lock file beside the entry (`fcntl.flock`, which Linux also applies on
NFS), so two jobs sharing a cache, or the first ranks of several nodes on a shared
filesystem, never prepare one entry at once: the second finds it fresh and reuses it.
Every other process polls until the entry is fresh; it never reads a half-written one,
since entries appear by rename. It waits without a limit: a preparer that fails ends the
job (the launcher stops the other ranks).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dsfm.data.corpus import STDLIB
from dsfm.data.format import META_FILE, read_meta
from dsfm.data.prepare import prepare
from dsfm.data.sources import HF_PREFIX, resolve_inputs

CACHE_ENV = "DSFM_CACHE"


def default_root() -> Path:
    """$DSFM_CACHE, else ~/.cache/dsfm: where the embedded corpus is prepared."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dsfm").expanduser()


def absolute(inputs: list[str]) -> list[str]:
    """Inputs with paths (and globs) made absolute, so the key and the recorded sources do
    not depend on the working directory; `stdlib` and `hf:` names stay as they are."""
    return [
        item
        if item == STDLIB or item.startswith(HF_PREFIX)
        else os.path.abspath(os.path.expanduser(item))
        for item in map(str, inputs)
    ]


def entry_dir(inputs: list[str], root: str | Path, vocab_size: int | None) -> Path:
    """The cache entry of `inputs` (absolute) tokenized with a BPE of `vocab_size`."""
    asked = json.dumps({"inputs": inputs, "vocab_size": vocab_size}).encode()
    first = inputs[0].rstrip("/*")
    stem = Path(first).stem if first else "data"
    if not any(c.isalnum() for c in stem):  # a glob such as dir/*.txt: the directory's
        stem = Path(first).parent.name
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem) or "data"
    return Path(root) / f"{stem}-{hashlib.sha256(asked).hexdigest()[:10]}"


def stale(entry: Path, inputs: list[str]) -> str | None:
    """Why `entry` does not hold `inputs` as they are now (None: it does)."""
    try:
        meta = read_meta(entry)
    except FileNotFoundError:
        return "missing"
    except ValueError as e:
        return f"the cached dataset is unusable ({e})"
    recorded = {s["path"] for s in meta["sources"]}
    current = resolve_inputs(inputs)
    paths = {s.path for s in current}
    if paths != recorded:
        added, removed = len(paths - recorded), len(recorded - paths)
        return f"the inputs changed ({added} file(s) added, {removed} removed)"
    written = (entry / META_FILE).stat().st_mtime
    newer = [s.path for s in current if s.kind not in ("stdlib", "hf")]
    newer = [p for p in newer if os.path.getmtime(p) > written]
    if newer:
        more = f" and {len(newer) - 1} more" if len(newer) > 1 else ""
        return f"{newer[0]}{more} changed since {entry.name} was prepared"
    return None


def prepared(
    inputs: list[str],
    root: str | Path,
    *,
    vocab_size: int | None,
    prepare_here: bool,
    say: Callable[[str], None] = print,
    progress: bool = True,
    poll_s: float = 1.0,
) -> Path:
    """The fresh cache entry of `inputs` under `root`, prepared here if needed (when
    `prepare_here`), else waited for. `vocab_size` None trains prepare's default BPE."""
    inputs = absolute(inputs)
    entry = entry_dir(inputs, root, vocab_size)
    if not prepare_here:
        while stale(entry, inputs) is not None:
            time.sleep(poll_s)
        return entry
    label = _label(inputs)
    entry.parent.mkdir(parents=True, exist_ok=True)
    with _locked(entry.with_name(f".{entry.name}.lock")):
        why = stale(entry, inputs)
        if why is None:
            say(f"data: {label} is prepared in {entry} (inputs unchanged since); reusing it")
            return entry
        if why == "missing":
            size = f"a BPE of {vocab_size} tokens" if vocab_size else "a BPE"
            say(f"data: preparing {label} into {entry} ({size} trained on it; done once)")
        else:
            say(f"data: {why}; preparing {label} again into {entry}")
        kwargs = {"vocab_size": vocab_size} if vocab_size else {}
        prepare(inputs, entry, force=True, progress=progress, **kwargs)
    return entry


def _label(inputs: list[str]) -> str:
    first = "the embedded corpus (stdlib)" if inputs[0] == STDLIB else inputs[0]
    return first + (f" and {len(inputs) - 1} more" if len(inputs) > 1 else "")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
