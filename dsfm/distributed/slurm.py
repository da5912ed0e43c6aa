"""Dry run of a Slurm launch: every task's host, environment and command, before queueing.

    python -m dsfm.distributed.slurm --nodelist 'node[01-02]' --tasks-per-node 8 -- CMD...

Tasks fill a node before the next (block distribution, srun's default) and the master is
the first host, as `env.detect` computes inside each real task.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Mapping, Sequence

from dsfm.distributed.env import (
    LaunchInfo,
    expand_nodelist,
    first_set,
    job_port,
    read_int,
    read_port,
    to_env,
)

DRY_RUN_PORT = 29500  # torch's conventional port; only for dry runs outside any Slurm job


def tasks(nodelist: str, tasks_per_node: int, port: int) -> list[dict[str, str]]:
    """Every task's host and environment for `srun` with block distribution (the default):
    ranks 0..7 on the first host of 8 per node."""
    if tasks_per_node < 1:
        raise ValueError(f"tasks per node must be at least 1, got {tasks_per_node}")
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is not a TCP port (1-65535)")
    hosts = expand_nodelist(nodelist)
    world = len(hosts) * tasks_per_node
    out = []
    for node, host in enumerate(hosts):
        for local in range(tasks_per_node):
            info = LaunchInfo(
                "slurm", node * tasks_per_node + local, local, world, tasks_per_node, hosts[0], port
            )
            out.append({"host": host, **to_env(info)})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """The command line in the module doc (also `--port P`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in args:
        # Split by hand so the command keeps its own options (argparse would read `--port`).
        cut = args.index("--")
        args, command = args[:cut], args[cut + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m dsfm.distributed.slurm",
        description="Dry run of a Slurm launch: print every task's host, environment and command.",
    )
    parser.add_argument(
        "--nodelist", help="Slurm host list, e.g. 'node[01-02]' (default: $SLURM_JOB_NODELIST)"
    )
    parser.add_argument("--tasks-per-node", type=int, required=True, help="tasks (GPUs) per node")
    parser.add_argument(
        "--port",
        type=int,
        help=f"MASTER_PORT (default: $MASTER_PORT, else derived from $SLURM_JOB_ID, "
        f"else {DRY_RUN_PORT})",
    )
    opts = parser.parse_args(args)
    nodelist = opts.nodelist or os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        parser.error("no --nodelist given and SLURM_JOB_NODELIST is not set (not in a job)")
    try:
        port = opts.port if opts.port is not None else _dry_run_port(os.environ)
        launch = tasks(nodelist, opts.tasks_per_node, port)
    except (ValueError, RuntimeError) as e:
        parser.error(str(e))
    n_nodes = len(launch) // opts.tasks_per_node
    print(
        f"# {len(launch)} tasks: {n_nodes} nodes x {opts.tasks_per_node}, block distribution, "
        f"master {launch[0]['MASTER_ADDR']}:{port}"
    )
    for task in launch:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in task.items() if k != "host")
        print(f"{task['host']}: {env} {shlex.join(command)}".rstrip())
    return 0


def _dry_run_port(env: Mapping[str, str]) -> int:
    """The port a real launch would get: the exported one, else the job's, else a fixed one."""
    if "MASTER_PORT" in env:
        return read_port(env)
    job_var = first_set(env, ("SLURM_JOB_ID", "SLURM_JOBID"))
    return job_port(read_int(env, job_var)) if job_var else DRY_RUN_PORT


if __name__ == "__main__":
    sys.exit(main())
