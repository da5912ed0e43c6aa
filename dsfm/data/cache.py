"""Raw text to a prepared dataset, prepared once and reused: `dsfm train --data FILE`, and a
run given no data at all (the embedded corpus).

A cache entry is a prepared dataset directory (`prepare.prepare`, tokenizer trained on the
inputs) named for what was asked: `ROOT/<first input's stem>-<key>`, the key hashing the
inputs as absolute paths and the vocabulary size. Before an entry is used it is checked
against the inputs (`stale`): the same files (a directory or glob that gained or lost one
is changed), each with the size and modification time it had when it was read (recorded
beside the entry in `.<entry>.inputs.json`; contents are not re-read, so a touched file is
prepared again, and clocks need not agree), and a dataset that passes `format.read_meta`'s
checks; the embedded corpus is stamped with the Python version whose stdlib it is. A stale
entry is prepared again and replaces the old one only when complete (`atomic`, via
prepare's `force`).

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
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dsfm.data.corpus import STDLIB
from dsfm.data.format import read_meta
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
        read_meta(entry)
        recorded = json.loads(_stamp_file(entry).read_text())
    except FileNotFoundError:
        return "missing"
    except ValueError as e:  # also a half-written stamp (json's error is a ValueError)
        return f"the cached dataset is unusable ({e})"
    current = _stamp(inputs)
    if current.keys() != recorded.keys():
        added, removed = len(current.keys() - recorded), len(recorded.keys() - current)
        return f"the inputs changed ({added} file(s) added, {removed} removed)"
    changed = [path for path, stamp in current.items() if stamp != recorded[path]]
    if changed:
        more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
        return f"{changed[0]}{more} changed since {entry.name} was prepared"
    return None


def _stamp(inputs: list[str]) -> dict[str, list | None]:
    """Each input file's size and modification time; the Python version for the embedded
    corpus (its stdlib is the text); None for an hf: dataset."""
    stamps: dict[str, list | None] = {}
    for s in resolve_inputs(inputs):
        if s.kind == "stdlib":
            stamps[s.path] = [platform.python_version()]
        elif s.kind == "hf":
            stamps[s.path] = None
        else:
            stat = os.stat(s.path)
            stamps[s.path] = [stat.st_size, stat.st_mtime_ns]
    return stamps


def _stamp_file(entry: Path) -> Path:
    return entry.with_name(f".{entry.name}.inputs.json")


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
    _stamp(inputs)  # a missing input is an error before anything is said or locked
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
        stamp = _stamp(inputs)  # before reading: a change while preparing shows next time
        _stamp_file(entry).unlink(missing_ok=True)
        kwargs = {"vocab_size": vocab_size} if vocab_size else {}
        prepare(inputs, entry, force=True, progress=progress, **kwargs)
        tmp = _stamp_file(entry).with_suffix(".tmp")
        tmp.write_text(json.dumps(stamp))
        os.replace(tmp, _stamp_file(entry))
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
