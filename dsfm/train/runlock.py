"""One writer per run directory: `dsfm train` holds RUN/train.lock while it runs.

Design choices:
- The lock is `fcntl.flock` on an open descriptor, so the kernel drops it when the process
  ends, however it ends (kill -9 and the OOM killer included): no stale lock can block a
  restart. The file also records the holder (host, pid, start time) for the refusal's
  message, and for the notice when a dead run's record is taken over. A clean exit empties
  the record; the file itself stays (deleting it would let two processes lock two files).
- Global rank 0 takes it, before anything in the directory is read or cleaned
  (`checkpoint.clean_stale` would otherwise delete a live run's `.partial-*`); the trainer
  hands the verdict to every rank before the engine is built. The descriptor is not
  inherited across exec (Python's default), so a helper process cannot keep a dead run's
  lock.
- What it covers: processes on one host, and hosts sharing NFSv4 (Linux turns flock into a
  lock the server keeps). Where flock fails outright (Lustre mounted without `-o flock`,
  some FUSE filesystems), the record alone is judged: a holder on this host whose pid is
  alive refuses, one on another host cannot be asked and is taken over with a warning.
  Where flock only reaches one node (Lustre `-o localflock`) a run on another node is not
  seen either: the takeover notice names it, so the overlap is visible in the log.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from dsfm.observe.rundir import lock_file

NO_FLOCK = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


class RunLocked(ValueError):
    """Another live `dsfm train` writes to this run directory (a ValueError: exit 2)."""


class RunLock:
    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    def release(self) -> None:
        """Empty the record and unlock (the kernel unlocks anyway when the process ends)."""
        if self.fd < 0:
            return
        try:
            os.ftruncate(self.fd, 0)
        finally:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = -1


def acquire(run_dir: Path, say: Callable[[str], None] = print) -> RunLock:
    """Lock `run_dir` for this process; RunLocked naming the holder and the fix if a live
    process holds it. A record left by a dead holder is taken over with one line to `say`."""
    path = lock_file(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            raise RunLocked(_refusal(run_dir, _read(fd))) from None
        except OSError as e:
            if e.errno not in NO_FLOCK:
                raise
            locked = False
        previous = _read(fd)  # what a holder that is gone left behind
        if previous is not None and previous.get("pid") != os.getpid():
            _take_over(run_dir, previous, locked, say)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_me()).encode() + b"\n", 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    return RunLock(fd, path)


def _me() -> dict:
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": started}


def _read(fd: int) -> dict | None:
    """The recorded holder; None for an empty record, {} for an unreadable one."""
    raw = os.pread(fd, 4096, 0)
    if not raw.strip():
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _holder(record: dict | None) -> str:
    if not record:
        return "an unknown process"
    return (
        f"pid {record.get('pid', '?')} on host {record.get('host', '?')} "
        f"(started {record.get('started', '?')})"
    )


def _refusal(run_dir: Path, record: dict | None) -> str:
    pid, host = (record or {}).get("pid", "PID"), (record or {}).get("host", "its host")
    return (
        f"{run_dir} is in use: another `dsfm train` writes to it, {_holder(record)}; wait "
        f"for it to finish, stop it (`kill {pid}` on {host}; it saves and exits), or train "
        "into another train.out_dir"
    )


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _take_over(run_dir: Path, record: dict, locked: bool, say: Callable[[str], None]) -> None:
    here = record.get("host") == socket.gethostname()
    if not locked and here and _alive(record.get("pid")):
        raise RunLocked(_refusal(run_dir, record))
    if locked or here:
        host = record.get("host")
        elsewhere = f" (sure if this filesystem's locks reach {host})" if host and not here else ""
        say(
            f"note: {lock_file(run_dir)}: {_holder(record)} is gone (stale lock){elsewhere}; "
            "taking over"
        )
        return
    say(
        f"warning: {lock_file(run_dir)}: this filesystem has no working locks, and the record "
        f"names {_holder(record)}, which cannot be checked from here; taking over (if it is "
        "still running, stop one of the two runs)"
    )
