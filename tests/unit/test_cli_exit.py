"""`dsfm.cli.run` ends a process that joined a process group without Python's finalization.

Python's finalization ends a gloo worker thread that is still freeing a finished collective's
tensors (it needs the GIL) with an unwind that C++ turns into an abort: status 134 after a
run that succeeded, in about half of these processes when they exit the ordinary way.
"""

from __future__ import annotations

import subprocess
import sys

from dsfm.distributed.env import free_port

SCRIPT = """
import os, sys
import torch, torch.distributed as d
from dsfm import cli
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1")
d.init_process_group("gloo")

def last_step(argv):  # a verb whose last collectives finish just before it returns
    print("trained")
    for _ in range(200):  # finished works whose tensors only gloo's worker threads hold
        d.all_gather([torch.zeros(1000)], torch.ones(1000), async_op=True)
    return int(argv[0])

if sys.argv[2] == "verb":  # a real verb, through the real `main`
    cli.run(sys.argv[3:])
cli.main = last_step
cli.run(sys.argv[2:])
"""


def run_joined(tmp_path, *argv: str) -> subprocess.CompletedProcess:
    script = tmp_path / "joined.py"
    script.write_text(SCRIPT)
    return subprocess.run(
        [sys.executable, str(script), str(free_port()), *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_joined_process_exits_with_the_verbs_status_and_its_output(tmp_path):
    for code in (0, 0, 0, 0, 0, 75):  # the ordinary exit aborts about every other time
        proc = run_joined(tmp_path, str(code))
        assert proc.returncode == code, proc.stderr[-2000:]
        assert proc.stdout == "trained\n"  # piped output is flushed before the exit
        assert "terminate called" not in proc.stderr


def test_a_joined_process_runs_real_verbs_to_their_status(tmp_path):
    proc = run_joined(tmp_path, "verb", "config", "--list")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "zero3_offload" in proc.stdout
    proc = run_joined(tmp_path, "verb", "config", "--config", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "missing.yaml" in proc.stderr
