"""Launcher detection: each launcher's real variables, Slurm's compressed lists, bad environments.

`detect` takes the environment as a dict, so most tests build one; only `ensure_env` and the
dry-run CLI touch `os.environ`, through monkeypatch.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dsfm.distributed import env as dist
from dsfm.distributed import slurm
from dsfm.distributed.env import LaunchInfo, detect, expand_nodelist, parse_tasks_per_node

# What the DeepSpeed launcher (deepspeed/launcher/launch.py) exports for rank 9 of 2 nodes x 8.
DEEPSPEED_ENV = {
    "RANK": "9",
    "LOCAL_RANK": "1",
    "WORLD_SIZE": "16",
    "LOCAL_SIZE": "8",
    "MASTER_ADDR": "10.0.0.1",
    "MASTER_PORT": "29500",
}

# torchrun --nnodes 2 --nproc-per-node 4, the second process on the second node.
TORCHRUN_ENV = {
    "RANK": "5",
    "LOCAL_RANK": "1",
    "WORLD_SIZE": "8",
    "LOCAL_WORLD_SIZE": "4",
    "GROUP_RANK": "1",
    "TORCHELASTIC_RUN_ID": "none",
    "MASTER_ADDR": "node01",
    "MASTER_PORT": "29400",
}

# `srun` task 11 of `sbatch --nodes=5 --ntasks-per-node=8`: local task 3 on node 2 (node02).
SRUN_ENV = {
    "SLURM_JOB_ID": "123456",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "11",
    "SLURM_LOCALID": "3",
    "SLURM_NODEID": "1",
    "SLURM_NTASKS": "40",
    "SLURM_STEP_NUM_TASKS": "40",
    "SLURM_NTASKS_PER_NODE": "8",
    "SLURM_STEP_TASKS_PER_NODE": "8(x5)",
    "SLURM_TASKS_PER_NODE": "8(x5)",
    "SLURM_JOB_NODELIST": "node[01-04,07]",
    "SLURM_STEP_NODELIST": "node[01-04,07]",
    "SLURMD_NODENAME": "node02",
}

# The sbatch batch script itself: job-wide variables, but no srun step.
BATCH_ENV = {
    "SLURM_JOB_ID": "123456",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NTASKS": "40",
    "SLURM_NTASKS_PER_NODE": "8",
    "SLURM_TASKS_PER_NODE": "8(x5)",
    "SLURM_JOB_NODELIST": "node[01-04,07]",
}


def without(env: dict[str, str], *names: str) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in names}


# --- detect, per launcher ---------------------------------------------------------------------


def test_deepspeed_launcher():
    assert detect(DEEPSPEED_ENV) == LaunchInfo("deepspeed", 9, 1, 16, 8, "10.0.0.1", 29500)


def test_torchrun():
    assert detect(TORCHRUN_ENV) == LaunchInfo("torchrun", 5, 1, 8, 4, "node01", 29400)


def test_torchrun_wins_over_slurm_variables():
    # `srun torchrun ...`: the task sees both; torchrun's ranks are the real ones.
    assert detect({**SRUN_ENV, **TORCHRUN_ENV}).launcher == "torchrun"


def test_srun_task_on_second_node():
    info = detect(SRUN_ENV)
    assert info == LaunchInfo("slurm", 11, 3, 40, 8, "node01", 20000 + 123456 % 20000)
    assert dist.describe(info) == "launcher=slurm rank=11/40 local_rank=3/8 master=node01:23456"


def test_srun_prefers_step_variables_and_exported_master():
    env = {
        **SRUN_ENV,
        "SLURM_STEP_NODELIST": "node[03-04]",  # a step on part of the allocation
        "SLURM_STEP_NUM_TASKS": "16",
        "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
    }
    info = detect(env)
    assert (info.world_size, info.master_addr) == (16, "node03")
    info = detect({**env, "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "31000"})
    assert (info.master_addr, info.master_port) == ("10.1.2.3", 31000)


def test_srun_falls_back_to_job_variables():
    env = without(SRUN_ENV, "SLURM_STEP_NODELIST", "SLURM_STEP_NUM_TASKS")
    env = without(env, "SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE")
    assert detect(env) == detect(SRUN_ENV)


def test_srun_uneven_tasks_per_node_uses_this_nodes_count():
    env = {
        **SRUN_ENV,
        "SLURM_STEP_NODELIST": "a1,b[2-3]",
        "SLURM_STEP_NUM_TASKS": "5",
        "SLURM_STEP_TASKS_PER_NODE": "2,2,1",
        "SLURM_PROCID": "4",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "2",
    }
    info = detect(env)
    assert (info.local_world_size, info.master_addr) == (1, "a1")


def test_batch_script_is_a_single_process():
    # No numeric SLURM_STEP_ID: the batch shell, not task 0 of 40.
    assert detect(BATCH_ENV) == LaunchInfo("single", 0, 0, 1, 1, "127.0.0.1", 0)
    assert detect({**BATCH_ENV, "SLURM_STEP_ID": "batch"}).launcher == "single"
    assert detect({**BATCH_ENV, "SLURM_STEP_ID": ""}).launcher == "single"


def test_single_process():
    assert detect({}) == LaunchInfo("single", 0, 0, 1, 1, "127.0.0.1", 0)
    info = detect({"MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29501", "LOCAL_RANK": "3"})
    assert info == LaunchInfo("single", 0, 0, 1, 1, "10.0.0.5", 29501)


def test_hand_made_single_rank_needs_no_master():
    info = detect({"RANK": "0", "WORLD_SIZE": "1"})
    assert info == LaunchInfo("deepspeed", 0, 0, 1, None, "127.0.0.1", 0)
    assert dist.describe(info) == "launcher=deepspeed rank=0/1 local_rank=0/? master=127.0.0.1:0"


def test_missing_local_rank_is_derived_from_rank():
    env = without(TORCHRUN_ENV, "LOCAL_RANK")
    assert detect(env).local_rank == 1  # 5 % LOCAL_WORLD_SIZE=4


# --- Slurm's compressed lists -----------------------------------------------------------------


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node01", ["node01"]),
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("a1,b[2-3]", ["a1", "b2", "b3"]),
        ("gpu[1-2]-ib", ["gpu1-ib", "gpu2-ib"]),
        (
            "rack[1-2]-node[01-02]",
            ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"],
        ),
        ("n[008-010]", ["n008", "n009", "n010"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[3]", ["n3"]),
        ("x[1-2],y,z[05,07]-eth", ["x1", "x2", "y", "z05-eth", "z07-eth"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize(
    "nodelist, message",
    [
        ("node[01-04", "unclosed '['"),
        ("node01-04]", "unmatched ']'"),
        ("node[[1-2]]", "nested '['"),
        ("node[04-01]", "reversed range '04-01'"),
        ("node[1-a]", "bad range '1-a'"),
        ("node[]", "bad range ''"),
        ("node[1-2-3]", "bad range '1-2-3'"),
        ("a,,b", "empty host name"),
        ("", "empty host name"),
    ],
)
def test_expand_nodelist_rejects_malformed(nodelist, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        expand_nodelist(nodelist)


@pytest.mark.parametrize(
    "value, counts",
    [("4", [4]), ("8(x2)", [8, 8]), ("2,1", [2, 1]), ("2(x3),1", [2, 2, 2, 1])],
)
def test_parse_tasks_per_node(value, counts):
    assert parse_tasks_per_node(value) == counts


@pytest.mark.parametrize("value", ["", "8(x)", "x2", "8(2)", "0", "8(x0)", "2,,1"])
def test_parse_tasks_per_node_rejects_malformed(value):
    with pytest.raises(ValueError, match="tasks-per-node"):
        parse_tasks_per_node(value)


# --- inconsistent environments ----------------------------------------------------------------


@pytest.mark.parametrize(
    "env, names",
    [
        ({"RANK": "0"}, ["RANK", "WORLD_SIZE"]),
        ({"WORLD_SIZE": "2"}, ["WORLD_SIZE", "RANK"]),
        ({**DEEPSPEED_ENV, "RANK": "one"}, ["RANK", "not an integer"]),
        ({**DEEPSPEED_ENV, "WORLD_SIZE": "16.0"}, ["WORLD_SIZE", "not an integer"]),
        ({**DEEPSPEED_ENV, "RANK": "-1"}, ["RANK", "negative"]),
        ({**DEEPSPEED_ENV, "LOCAL_RANK": "-2"}, ["LOCAL_RANK", "negative"]),
        ({**DEEPSPEED_ENV, "WORLD_SIZE": "0"}, ["WORLD_SIZE", "at least 1"]),
        ({**DEEPSPEED_ENV, "RANK": "16"}, ["RANK=16", "WORLD_SIZE=16"]),
        ({**DEEPSPEED_ENV, "LOCAL_RANK": "8"}, ["LOCAL_RANK=8", "LOCAL_SIZE=8"]),
        ({**TORCHRUN_ENV, "LOCAL_RANK": "4"}, ["LOCAL_RANK=4", "LOCAL_WORLD_SIZE=4"]),
        ({**TORCHRUN_ENV, "LOCAL_WORLD_SIZE": "16"}, ["LOCAL_WORLD_SIZE=16", "WORLD_SIZE=8"]),
        (without(DEEPSPEED_ENV, "MASTER_PORT"), ["MASTER_PORT is not set"]),
        (without(DEEPSPEED_ENV, "MASTER_ADDR"), ["MASTER_ADDR is not set"]),
        (without(DEEPSPEED_ENV, "MASTER_ADDR", "MASTER_PORT"), ["MASTER_ADDR and MASTER_PORT"]),
        ({**DEEPSPEED_ENV, "MASTER_PORT": "70000"}, ["MASTER_PORT=70000"]),
        ({"MASTER_PORT": "http"}, ["MASTER_PORT", "not an integer"]),
        ({**SRUN_ENV, "SLURM_PROCID": "40"}, ["SLURM_PROCID=40", "SLURM_STEP_NUM_TASKS=40"]),
        ({**SRUN_ENV, "SLURM_LOCALID": "8"}, ["SLURM_LOCALID=8", "SLURM_STEP_TASKS_PER_NODE"]),
        ({**SRUN_ENV, "SLURM_LOCALID": "x"}, ["SLURM_LOCALID", "not an integer"]),
        (without(SRUN_ENV, "SLURM_LOCALID"), ["SLURM_LOCALID"]),
        (without(SRUN_ENV, "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"), ["SLURM_NTASKS"]),
        ({**SRUN_ENV, "SLURM_STEP_NODELIST": "node[01-"}, ["SLURM_STEP_NODELIST", "MASTER_ADDR"]),
        (without(SRUN_ENV, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST"), ["SLURM_JOB_NODELIST"]),
        (without(SRUN_ENV, "SLURM_JOB_ID"), ["SLURM_JOB_ID", "MASTER_PORT"]),
        ({**SRUN_ENV, "SLURM_STEP_TASKS_PER_NODE": "8(x"}, ["SLURM_STEP_TASKS_PER_NODE"]),
        (
            without({**SRUN_ENV, "SLURM_STEP_TASKS_PER_NODE": "8,4"}, "SLURM_NODEID"),
            ["SLURM_NODEID"],
        ),
        (
            {**SRUN_ENV, "SLURM_STEP_TASKS_PER_NODE": "8,4", "SLURM_LOCALID": "5"},
            ["SLURM_LOCALID=5", "SLURM_STEP_TASKS_PER_NODE[1]=4"],
        ),
        ({**SRUN_ENV, "SLURM_STEP_TASKS_PER_NODE": "8,4", "SLURM_NODEID": "2"}, ["SLURM_NODEID"]),
    ],
)
def test_inconsistent_environment_names_the_variable(env, names):
    with pytest.raises(RuntimeError) as err:
        detect(env)
    for name in names:
        assert name in str(err.value)


# --- ensure_env on the real os.environ --------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch):
    """os.environ without any launcher's variables (the suite itself may run under one),
    restored afterwards whole: `ensure_env` adds variables that monkeypatch never saw, and a
    leftover LOCAL_WORLD_SIZE=1 would reach the jobs later tests launch."""
    launch_vars = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"}
    launch_vars |= {"MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"}
    saved = dict(os.environ)
    for name in list(os.environ):
        if name in launch_vars or name.startswith("SLURM"):
            monkeypatch.delenv(name)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


def test_ensure_env_single_process(clean_env):
    info = dist.ensure_env()
    assert {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")} == {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
    }
    assert 0 < int(os.environ["MASTER_PORT"]) == info.master_port
    assert (dist.rank(), dist.local_rank(), dist.world_size(), dist.is_rank0()) == (0, 0, 1, True)


def test_ensure_env_exports_an_srun_task(clean_env):
    for name, value in SRUN_ENV.items():
        clean_env.setenv(name, value)
    info = dist.ensure_env()
    assert info.launcher == "slurm"
    assert {k: os.environ[k] for k in dist.to_env(info)} == {
        "RANK": "11",
        "WORLD_SIZE": "40",
        "LOCAL_RANK": "3",
        "LOCAL_WORLD_SIZE": "8",
        "MASTER_ADDR": "node01",
        "MASTER_PORT": "23456",
    }
    assert (dist.rank(), dist.local_rank(), dist.world_size(), dist.is_rank0()) == (
        11,
        3,
        40,
        False,
    )


def test_ensure_env_refuses_half_set_environment(clean_env):
    clean_env.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="RANK is set but WORLD_SIZE is not"):
        dist.ensure_env()


# --- dry run ----------------------------------------------------------------------------------


def test_plan_two_nodes_of_eight():
    tasks = slurm.tasks("node[01-02]", 8, 23456)
    assert [int(t["RANK"]) for t in tasks] == list(range(16))
    assert [t["host"] for t in tasks] == ["node01"] * 8 + ["node02"] * 8
    assert [int(t["LOCAL_RANK"]) for t in tasks] == list(range(8)) * 2
    assert tasks[9] == {
        "host": "node02",
        "RANK": "9",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "16",
        "LOCAL_WORLD_SIZE": "8",
        "MASTER_ADDR": "node01",
        "MASTER_PORT": "23456",
    }


def test_plan_agrees_with_detect_inside_each_task():
    for node, task in enumerate(slurm.tasks("gpu[1-3]-ib", 2, 23456)):
        env = {
            "SLURM_STEP_ID": "0",
            "SLURM_JOB_ID": "123456",
            "SLURM_PROCID": task["RANK"],
            "SLURM_LOCALID": task["LOCAL_RANK"],
            "SLURM_NODEID": str(node // 2),
            "SLURM_STEP_NUM_TASKS": "6",
            "SLURM_STEP_TASKS_PER_NODE": "2(x3)",
            "SLURM_STEP_NODELIST": "gpu[1-3]-ib",
        }
        assert {"host": task["host"], **dist.to_env(detect(env))} == task


def test_plan_rejects_bad_arguments():
    with pytest.raises(ValueError, match="tasks per node"):
        slurm.tasks("node01", 0, 23456)
    with pytest.raises(ValueError, match="port"):
        slurm.tasks("node01", 8, 0)


def task_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if not line.startswith("#")]


def test_dry_run_cli_lists_every_task(capsys, clean_env):
    argv = ["--nodelist", "node[01-02]", "--tasks-per-node", "8", "--port", "23456"]
    assert slurm.main([*argv, "--", "python", "train.py", "--port", "9", "a b.yaml"]) == 0
    lines = task_lines(capsys.readouterr().out)
    assert len(lines) == 16
    for rank, line in enumerate(lines):
        host = "node01" if rank < 8 else "node02"
        assert line == (
            f"{host}: RANK={rank} LOCAL_RANK={rank % 8} WORLD_SIZE=16 LOCAL_WORLD_SIZE=8 "
            "MASTER_ADDR=node01 MASTER_PORT=23456 python train.py --port 9 'a b.yaml'"
        )


def test_dry_run_cli_reads_the_allocation(capsys, clean_env):
    clean_env.setenv("SLURM_JOB_NODELIST", "a1,b[2-3]")
    clean_env.setenv("SLURM_JOB_ID", "40001")
    assert slurm.main(["--tasks-per-node", "2"]) == 0
    lines = task_lines(capsys.readouterr().out)
    assert len(lines) == 6
    assert lines[-1] == (
        "b3: RANK=5 LOCAL_RANK=1 WORLD_SIZE=6 LOCAL_WORLD_SIZE=2 MASTER_ADDR=a1 MASTER_PORT=20001"
    )


def test_dry_run_cli_needs_a_nodelist(capsys, clean_env):
    with pytest.raises(SystemExit) as exit_:
        slurm.main(["--tasks-per-node", "8", "--", "python", "train.py"])
    assert exit_.value.code == 2
    assert "SLURM_JOB_NODELIST" in capsys.readouterr().err


def test_dry_run_cli_reports_a_bad_nodelist(capsys, clean_env):
    with pytest.raises(SystemExit):
        slurm.main(["--nodelist", "node[02-01]", "--tasks-per-node", "8"])
    assert "reversed range" in capsys.readouterr().err


def test_dry_run_as_a_module():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dsfm.distributed.slurm",
            "--nodelist",
            "node[01-02]",
            "--tasks-per-node",
            "8",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "MASTER_"))},
    ).stdout
    lines = task_lines(out)
    assert len(lines) == 16
    assert all("MASTER_ADDR=node01 MASTER_PORT=29500" in line for line in lines)


def test_rendezvous_problems_name_the_port_and_the_fix(monkeypatch):
    busy = (
        "The server socket has failed to listen on any local network address. port: 29500, "
        "useIpv6: false, code: -98, name: EADDRINUSE, message: address already in use"
    )
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    line = dist.rendezvous_problem(busy)
    assert "MASTER_PORT=29500 is already in use" in line and "--master_port" in line
    assert "unset MASTER_PORT" not in line  # every rank must agree on a port: no guessing
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert "unset MASTER_PORT and dsfm picks a free one" in dist.rendezvous_problem(busy)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    line = dist.rendezvous_problem("Timed out after 31 seconds waiting for clients.\nmore")
    assert line.startswith("rank 3 could not reach the master at 10.0.0.1:29500 (Timed out")
    assert "\n" not in line and "MASTER_ADDR" in line
    assert isinstance(dist.LaunchError("x"), ValueError)  # the CLI's one line, exit 2
