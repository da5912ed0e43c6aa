"""Directories that appear whole or not at all: a prepared dataset, an export, a plain
checkpoint.

`staged_dir(out)` yields a temporary directory beside `out` (same filesystem, so the final
rename is atomic); the caller writes into it, and when the block succeeds it is renamed to
`out`, or it is removed when the block fails. An existing `out` is refused unless
`replace=True`, in which case the old directory is swapped out only after the new one is
complete (moved aside, the new one renamed in, then the old one deleted; a failure of the
rename puts the old one back). Checkpoint tags publish differently (several ranks write one
tag): `dsfm.train.checkpoint`.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_dir(out: Path, replace: bool = False) -> Iterator[Path]:
    out = Path(out)
    if not replace:
        refuse_existing(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # A plain mkdir (not mkdtemp) so the final directory gets the usual umask permissions.
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        _publish(tmp, out, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def refuse_existing(out: Path) -> None:
    if out.exists() or out.is_symlink():
        raise FileExistsError(f"{out} already exists; choose a new output directory")


def _publish(tmp: Path, out: Path, replace: bool) -> None:
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)
        return
    if not replace:  # it appeared while we worked
        refuse_existing(out)
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old)
