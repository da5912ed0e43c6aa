"""Where this process sits: rank, local rank and world size, from whichever launcher started us.

This is the one module that reads launcher environments. `detect(env)` is pure (it takes the
environment as a mapping, so tests build dicts instead of patching `os.environ`) and returns a
`LaunchInfo`; `ensure_env()` writes it back as RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT (plus LOCAL_WORLD_SIZE when known), the variables `deepspeed.init_distributed`
reads. First match wins:

- torchrun and the DeepSpeed launcher export RANK/WORLD_SIZE themselves; we only check them.
  torchrun also sets TORCHELASTIC_RUN_ID, which is how the two are told apart (for logs).
- an `srun` task gets SLURM_PROCID, SLURM_LOCALID, ...; the master is the first host of the
  step's node list, expanded by our own parser so compute nodes need no `scontrol`, and the
  port is derived from the job id, so every task agrees without talking to the others.
  MASTER_ADDR/MASTER_PORT exported by the sbatch script win over both.
- nothing set: one process, so `dsfm train` on a laptop runs the same code path as a cluster.

An inconsistent environment fails here, naming the variable, because past this point a wrong
rank shows up as a hang in the first collective rather than as an error.

`python -m dsfm.distributed.slurm` is a dry run of a Slurm launch (`slurm.py`).

Rank 0 speaks (`print0`); every rank still joins collectives (`collectives.py`).
Initialising the communication backend is `dsfm.train.engine.init_distributed`, the one
module that imports deepspeed; this one imports neither torch nor deepspeed, so it stays
cheap to import.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

DEFAULT_MASTER_ADDR = "127.0.0.1"


class LaunchError(RuntimeError, ValueError):
    """The launch environment is wrong: one line naming the variable and the fix. A
    ValueError too, so the command line reports it as bad input (exit 2, no traceback)."""


@dataclass(frozen=True)
class LaunchInfo:
    """This process's place in the job, as its launcher described it."""

    launcher: str  # "torchrun", "deepspeed", "slurm" or "single"
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int | None  # None: the launcher did not say (e.g. RANK/WORLD_SIZE by hand)
    master_addr: str
    master_port: int  # 0: not chosen yet; ensure_env picks a free one (one-process worlds only)


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def is_rank0() -> bool:
    return rank() == 0


def print0(*args: Any, **kwargs: Any) -> None:
    if is_rank0():
        print(*args, **kwargs, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rendezvous_problem(error: str) -> str:
    """What went wrong joining the process group (`error`: the backend's message), and the
    fix, in one line. Rank 0 listens on MASTER_ADDR:MASTER_PORT; every other rank connects."""
    addr, port = os.environ.get("MASTER_ADDR", "?"), os.environ.get("MASTER_PORT", "?")
    if "EADDRINUSE" in error or "address already in use" in error.lower():
        single = world_size() == 1
        return (
            f"MASTER_PORT={port} is already in use on this machine (another job, or a run "
            "that has not exited), so rank 0 cannot listen on it: pick a free port with "
            f"`deepspeed --master_port N` or `export MASTER_PORT=N`"
            + ("; or unset MASTER_PORT and dsfm picks a free one" if single else "")
        )
    first = error.strip().splitlines()[0] if error.strip() else "no reason given"
    return (
        f"rank {rank()} could not reach the master at {addr}:{port} ({first}): check that "
        "rank 0 is running and that MASTER_ADDR and MASTER_PORT (`deepspeed --master_addr / "
        "--master_port`) name its host and a port open between the nodes"
    )


# --- detecting the launcher -------------------------------------------------------------------


def ensure_env() -> LaunchInfo:
    """Export this process's launch as the variables DeepSpeed reads; refuse inconsistent ones."""
    info = detect(os.environ)
    if info.master_port == 0:
        # Chosen here rather than in detect() to keep detect() pure; a zero port only comes
        # from one-process worlds, where no other rank has to agree on it.
        info = replace(info, master_port=free_port())
    os.environ.update(to_env(info))
    return info


def detect(env: Mapping[str, str]) -> LaunchInfo:
    """Which launcher started this process, and where the process sits in its job."""
    if "RANK" in env or "WORLD_SIZE" in env:
        return _from_rank_env(env)
    if _is_srun_task(env):
        return _from_slurm(env)
    return _single(env)


def to_env(info: LaunchInfo) -> dict[str, str]:
    """The variables DeepSpeed (and torch.distributed's env:// rendezvous) read."""
    local_world = (
        {} if info.local_world_size is None else {"LOCAL_WORLD_SIZE": info.local_world_size}
    )
    values = {
        "RANK": info.rank,
        "LOCAL_RANK": info.local_rank,
        "WORLD_SIZE": info.world_size,
        **local_world,
        "MASTER_ADDR": info.master_addr,
        "MASTER_PORT": info.master_port,
    }
    return {name: str(value) for name, value in values.items()}


def describe(info: LaunchInfo) -> str:
    """One log line: `launcher=slurm rank=3/16 local_rank=3/8 master=node01:23456`."""
    local_world = "?" if info.local_world_size is None else info.local_world_size
    return (
        f"launcher={info.launcher} rank={info.rank}/{info.world_size} "
        f"local_rank={info.local_rank}/{local_world} "
        f"master={info.master_addr}:{info.master_port}"
    )


def job_port(job_id: int) -> int:
    """MASTER_PORT for a Slurm job: the same on every task, different between jobs.

    Two jobs sharing a master node collide only if their ids are 20000 apart; export
    MASTER_PORT in the sbatch script if that happens on your cluster.
    """
    return 20000 + job_id % 20000


def _from_rank_env(env: Mapping[str, str]) -> LaunchInfo:
    for present, absent in (("RANK", "WORLD_SIZE"), ("WORLD_SIZE", "RANK")):
        if absent not in env:
            raise LaunchError(
                f"{present} is set but {absent} is not: launch with `deepspeed`, `torchrun` or "
                f"`srun`, export both (a hand-made launch), or unset {present} to run as a "
                "single process"
            )
    launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "deepspeed"
    world = read_int(env, "WORLD_SIZE", minimum=1)
    rank_ = read_int(env, "RANK")
    # torchrun says LOCAL_WORLD_SIZE; the DeepSpeed launcher says LOCAL_SIZE.
    local_world_var = first_set(env, ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"))
    local_world = read_int(env, local_world_var, minimum=1) if local_world_var else None
    if "LOCAL_RANK" in env:
        local = read_int(env, "LOCAL_RANK")
    else:
        # A hand-made launch: assume ranks are packed node by node, as every launcher does.
        local = rank_ if local_world is None else rank_ % local_world
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in env]
    if missing and world > 1:
        raise LaunchError(
            f"WORLD_SIZE={world} but {' and '.join(missing)} {_is_are(missing)} not set: every "
            "rank must meet at the same address; export MASTER_ADDR and MASTER_PORT (the "
            "`deepspeed` launcher and torchrun do this for you)"
        )
    info = LaunchInfo(
        launcher=launcher,
        rank=rank_,
        local_rank=local,
        world_size=world,
        local_world_size=local_world,
        master_addr=env.get("MASTER_ADDR", DEFAULT_MASTER_ADDR),
        master_port=read_port(env) if "MASTER_PORT" in env else 0,
    )
    _check(info, "RANK", "WORLD_SIZE", "LOCAL_RANK", local_world_var or "LOCAL_WORLD_SIZE")
    return info


def _is_srun_task(env: Mapping[str, str]) -> bool:
    # An sbatch *batch script* also carries SLURM_JOB_ID, SLURM_PROCID=0 and SLURM_NTASKS=N, yet
    # it is one process, not task 0 of N: taking it for rank 0 would wait forever for N-1 peers
    # that were never started. Only tasks started by srun run in a job step with a numeric
    # SLURM_STEP_ID (the batch script has none, or a non-numeric one), so that is the test; an
    # unset or non-numeric id falls through to a single process.
    step = env.get("SLURM_STEP_ID", "")
    return step.isascii() and step.isdigit()


def _from_slurm(env: Mapping[str, str]) -> LaunchInfo:
    # The step's own variables first: they describe this srun, which may use fewer tasks or
    # nodes than the allocation (SLURM_NTASKS, SLURM_JOB_NODELIST).
    world_var = first_set(env, ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"))
    missing = [name for name in ("SLURM_PROCID", "SLURM_LOCALID") if name not in env]
    if world_var is None:
        missing.append("SLURM_NTASKS")
    if missing:
        raise LaunchError(
            f"SLURM_STEP_ID={env['SLURM_STEP_ID']} marks an srun task, but {', '.join(missing)} "
            f"{_is_are(missing)} not set: run the command under `srun` directly (not through a "
            "wrapper that filters the environment), or export RANK, WORLD_SIZE, LOCAL_RANK, "
            "MASTER_ADDR and MASTER_PORT yourself"
        )
    assert world_var is not None  # for the type checker: a missing one raised above
    local_world, local_world_var = _slurm_local_world_size(env)
    info = LaunchInfo(
        launcher="slurm",
        rank=read_int(env, "SLURM_PROCID"),
        local_rank=read_int(env, "SLURM_LOCALID"),
        world_size=read_int(env, world_var, minimum=1),
        local_world_size=local_world,
        master_addr=env["MASTER_ADDR"] if "MASTER_ADDR" in env else _slurm_master_addr(env),
        master_port=read_port(env) if "MASTER_PORT" in env else _slurm_port(env),
    )
    _check(info, "SLURM_PROCID", world_var, "SLURM_LOCALID", local_world_var)
    return info


def _slurm_local_world_size(env: Mapping[str, str]) -> tuple[int | None, str]:
    """Tasks on this node, and the variable it came from (for error messages)."""
    var = first_set(
        env, ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    )
    if var is None:
        return None, "SLURM_STEP_TASKS_PER_NODE"
    try:
        counts = parse_tasks_per_node(env[var])
    except ValueError as e:
        raise LaunchError(f"{var}: {e}") from None
    if len(set(counts)) == 1:
        return counts[0], var
    # Uneven layouts (`2,1`) list one count per node of the step, in node-list order.
    if "SLURM_NODEID" not in env:
        raise LaunchError(
            f"{var}={env[var]} differs between nodes but SLURM_NODEID is not set, so this "
            "node's task count is unknown: run under `srun`, which sets both"
        )
    node = read_int(env, "SLURM_NODEID")
    if node >= len(counts):
        raise LaunchError(
            f"SLURM_NODEID={node} but {var}={env[var]} lists only {len(counts)} nodes: the "
            "environment mixes two steps; run the command under one `srun`"
        )
    return counts[node], f"{var}[{node}]"  # named as an index into the list, for messages


def _slurm_master_addr(env: Mapping[str, str]) -> str:
    var = first_set(env, ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"))
    if var is None:
        raise LaunchError(
            "cannot choose MASTER_ADDR: neither MASTER_ADDR nor SLURM_STEP_NODELIST / "
            "SLURM_JOB_NODELIST is set; export MASTER_ADDR in the sbatch script"
        )
    try:
        return expand_nodelist(env[var])[0]
    except ValueError as e:
        raise LaunchError(
            f"{var}: {e}; export MASTER_ADDR in the sbatch script to bypass it"
        ) from None


def _slurm_port(env: Mapping[str, str]) -> int:
    var = first_set(env, ("SLURM_JOB_ID", "SLURM_JOBID"))
    if var is None:
        raise LaunchError(
            "cannot choose MASTER_PORT: neither MASTER_PORT nor SLURM_JOB_ID is set; export "
            "MASTER_PORT in the sbatch script"
        )
    return job_port(read_int(env, var))


def _single(env: Mapping[str, str]) -> LaunchInfo:
    # A stray LOCAL_RANK without RANK/WORLD_SIZE is ignored: one process is rank 0 of 1.
    return LaunchInfo(
        launcher="single",
        rank=0,
        local_rank=0,
        world_size=1,
        local_world_size=1,
        master_addr=env.get("MASTER_ADDR", DEFAULT_MASTER_ADDR),
        master_port=read_port(env) if "MASTER_PORT" in env else 0,
    )


def _check(
    info: LaunchInfo, rank_var: str, world_var: str, local_rank_var: str, local_world_var: str
) -> None:
    """Ranks inside their worlds; the names are the launcher's own, so users can find them."""
    if info.rank >= info.world_size:
        raise LaunchError(
            f"{rank_var}={info.rank} is not below {world_var}={info.world_size}: ranks run from "
            f"0 to {world_var}-1; every process of a job must be started with the same world size"
        )
    local_world = info.local_world_size
    if local_world is None:
        return
    if local_world > info.world_size:
        raise LaunchError(
            f"{local_world_var}={local_world} is more than {world_var}={info.world_size}: a node "
            "cannot hold more ranks than the whole job; the two come from different launches"
        )
    if info.local_rank >= local_world:
        raise LaunchError(
            f"{local_rank_var}={info.local_rank} is not below {local_world_var}={local_world}: "
            f"local ranks run from 0 to {local_world_var}-1 on each node; the two come from "
            "different launches"
        )


def read_int(env: Mapping[str, str], name: str, minimum: int = 0) -> int:
    raw = env[name]
    try:
        value = int(raw.strip())
    except ValueError:
        raise LaunchError(
            f"{name}={raw!r} is not an integer: launchers export whole numbers; fix or unset "
            f"{name} in the script that sets it"
        ) from None
    if value < 0:
        raise LaunchError(f"{name}={value} is negative: fix or unset it in the launch script")
    if value < minimum:
        raise LaunchError(f"{name}={value} must be at least {minimum}")
    return value


def read_port(env: Mapping[str, str]) -> int:
    port = read_int(env, "MASTER_PORT")
    if not 1 <= port <= 65535:
        raise LaunchError(f"MASTER_PORT={port} is not a TCP port (1-65535)")
    return port


def first_set(env: Mapping[str, str], names: Sequence[str]) -> str | None:
    return next((name for name in names if name in env), None)


def _is_are(names: Sequence[str]) -> str:
    return "is" if len(names) == 1 else "are"


# --- Slurm's compressed lists -----------------------------------------------------------------


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's host list (`node[01-04,07]`, `a1,b[2-3]`, `gpu[1-2]-ib`) as host names.

    Zero padding follows the lower bound, as in Slurm (`[08-10]` → 08, 09, 10). Several
    brackets in one name expand leftmost outermost, Slurm's order:
    `rack[1-2]-node[01-02]` → rack1-node01, rack1-node02, rack2-node01, rack2-node02.
    """
    hosts: list[str] = []
    for pattern in _split_hosts(nodelist):
        hosts += _expand_pattern(pattern, nodelist)
    return hosts


def _split_hosts(nodelist: str) -> list[str]:
    """Split at the commas between host patterns, not the ones inside brackets."""
    patterns, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested '[' at position {i} in host list {nodelist!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unmatched ']' at position {i} in host list {nodelist!r}")
        elif ch == "," and depth == 0:
            patterns.append(nodelist[start:i].strip())
            start = i + 1
    if depth:
        raise ValueError(f"unclosed '[' in host list {nodelist!r}")
    patterns.append(nodelist[start:].strip())
    if not all(patterns):
        raise ValueError(f"empty host name in host list {nodelist!r}")
    return patterns


def _expand_pattern(pattern: str, nodelist: str) -> list[str]:
    """One host pattern (brackets balanced, not nested) as host names."""
    open_at = pattern.find("[")
    if open_at < 0:
        return [pattern]
    close_at = pattern.index("]", open_at)
    numbers = _expand_ranges(pattern[open_at + 1 : close_at], nodelist)
    tails = _expand_pattern(pattern[close_at + 1 :], nodelist)
    return [pattern[:open_at] + number + tail for number in numbers for tail in tails]


def _expand_ranges(body: str, nodelist: str) -> list[str]:
    """`01-04,07` → 01, 02, 03, 04, 07."""
    numbers = []
    for item in body.split(","):
        lo, dash, hi = item.partition("-")
        hi = hi if dash else lo
        if not (_is_number(lo) and _is_number(hi)):
            raise ValueError(f"bad range {item!r} in host list {nodelist!r}: expected N or N-M")
        if int(hi) < int(lo):
            raise ValueError(f"reversed range {item!r} in host list {nodelist!r}")
        numbers += [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1)]
    return numbers


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()


_TASKS_ITEM = re.compile(r"([0-9]+)(?:\(x([0-9]+)\))?")


def parse_tasks_per_node(value: str) -> list[int]:
    """Slurm's tasks-per-node list, one count per node: `8(x2)` → [8, 8], `2,1` → [2, 1]."""
    counts = []
    for item in value.split(","):
        match = _TASKS_ITEM.fullmatch(item.strip())
        if match is None or int(match[1]) == 0 or (match[2] and int(match[2]) == 0):
            raise ValueError(
                f"bad tasks-per-node {value!r}: expected counts like `8`, `8(x2)` or `2,1`"
            )
        counts += [int(match[1])] * int(match[2] or 1)
    return counts
