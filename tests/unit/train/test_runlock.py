"""The run directory's one-writer lock, against real processes holding and losing it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from dsfm.observe.rundir import lock_file
from dsfm.train import runlock

HOLD = (
    "from dsfm.train import runlock; import sys, time; runlock.acquire(sys.argv[1]); "
    "print('held', flush=True); time.sleep(600)"
)


def hold(run_dir) -> subprocess.Popen:
    """Another process holding the lock, as a running `dsfm train` would."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_holder_is_refused_by_host_and_pid_and_a_killed_one_taken_over(tmp_path):
    proc = hold(tmp_path)
    try:
        with pytest.raises(runlock.RunLocked) as e:
            runlock.acquire(tmp_path, say=pytest.fail)
        text = str(e.value)
        assert f"pid {proc.pid} on host {socket.gethostname()}" in text
        assert f"kill {proc.pid}" in text and "another train.out_dir" in text
    finally:
        proc.send_signal(signal.SIGKILL)  # kill -9: no cleanup code runs
        proc.wait()
    assert json.loads(lock_file(tmp_path).read_text())["pid"] == proc.pid  # record left
    said = []
    lock = runlock.acquire(tmp_path, say=said.append)
    assert len(said) == 1 and f"pid {proc.pid}" in said[0] and "stale lock" in said[0]
    assert json.loads(lock_file(tmp_path).read_text())["pid"] == os.getpid()
    lock.release()
    assert lock_file(tmp_path).read_text() == ""  # a clean exit leaves no record
    runlock.acquire(tmp_path, say=pytest.fail).release()  # so nothing to take over


def test_a_leftover_unreadable_record_is_taken_over_with_a_notice(tmp_path):
    lock_file(tmp_path).write_text("garbage from a copy")
    said = []
    runlock.acquire(tmp_path / ".", say=said.append).release()
    assert len(said) == 1 and "an unknown process is gone" in said[0]


def test_without_working_flock_the_record_alone_decides(tmp_path, monkeypatch):
    """Lustre without `-o flock`: flock fails (ENOLCK, simulated: no such mount here); a
    live pid on this host is still refused, one on another host taken over with a warning."""
    import errno

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "no locks")

    monkeypatch.setattr(runlock.fcntl, "flock", no_flock)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    record = {"host": socket.gethostname(), "pid": sleeper.pid, "started": "now"}
    lock_file(tmp_path).write_text(json.dumps(record))
    try:
        with pytest.raises(runlock.RunLocked, match=f"pid {sleeper.pid}"):
            runlock.acquire(tmp_path, say=pytest.fail)
    finally:
        sleeper.kill()
        sleeper.wait()
    said = []
    runlock.acquire(tmp_path, say=said.append).release()
    assert "stale lock" in said[0]
    lock_file(tmp_path).write_text(json.dumps({**record, "host": "other-node"}))
    said = []
    runlock.acquire(tmp_path, say=said.append).release()
    assert said[0].startswith("warning:") and "cannot be checked" in said[0]
