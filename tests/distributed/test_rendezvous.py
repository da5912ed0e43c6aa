"""A rendezvous that cannot happen ends in one line naming MASTER_PORT and the fix, not a
traceback per rank: a port already in use under the DeepSpeed launcher (run as an installed
package would be, `--module dsfm.launch.pretrain`), and a master nobody listens for."""

from __future__ import annotations

import socket
import sys

import pytest

from tests.conftest import TINY, run_cmd

pytestmark = pytest.mark.distributed


def errors(proc) -> list[str]:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    return [line for line in proc.stderr.splitlines() if "error:" in line]


def test_busy_port_under_the_deepspeed_launcher(byte_data, tmp_path):
    with socket.socket() as busy:  # listening, as a job still running on that port would
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cmd(
            [
                sys.executable,
                "-m",
                "deepspeed.launcher.runner",
                "--num_gpus",
                "2",
                "--master_port",
                str(port),
                "--module",
                "dsfm.launch.pretrain",
                "--ds",
                "zero0",
                *TINY,
                f"data.path={byte_data}",
                f"train.out_dir={tmp_path / 'run'}",
                "train.max_steps=3",
            ],  # fmt: skip
            check=False,
            timeout=300,
        )
    assert proc.returncode != 0
    (line,) = errors(proc)
    assert line.startswith(f"dsfm train: error: MASTER_PORT={port} is already in use")
    assert "--master_port N" in line and "export MASTER_PORT=N" in line


def test_unreachable_master(byte_data, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run_cmd(
        [
            sys.executable,
            "-m",
            "dsfm.cli",
            "train",
            *TINY,
            f"data.path={byte_data}",
            f"train.out_dir={tmp_path / 'run'}",
            "train.watchdog_s=2",
        ],  # fmt: skip
        env={
            "RANK": "1",
            "WORLD_SIZE": "2",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        },  # fmt: skip
        check=False,
        timeout=300,
    )
    assert proc.returncode == 2
    (line,) = errors(proc)
    assert line.startswith(
        f"dsfm train: error: rank 1 could not reach the master at 127.0.0.1:{port}"
    )
    assert "MASTER_PORT" in line
