"""Fault injection for tests: the hooks production code calls where faults strike.

ONE environment variable, read once at import; every hook below returns at once when it is
unset. Comma-separated `key=value` items:
  nan_at=5 | nan_at=3+6-8   multiply the loss by NaN at these steps (1-based, inclusive);
                            each step fires once per process, so after a rollback the
                            replayed step numbers see fresh data, as the trainer intends
  spike_at=9                multiply the loss by 50 at this step
  hang_at=3                 sleep forever at the start of this step
  step_s=0.3                every step takes at least 0.3 s longer: a window for tests that
                            signal a running job (a fast CPU run may otherwise finish first)
  kill_at=6:PHASE           SIGKILL this process at step 6 in PHASE: step (mid-step, after the
                            first backward), save_shards (after this rank wrote its files,
                            before the ranks agree on the outcome), save_publish (rank 0:
                            after the rename, before `latest`), save_done (after `latest`)
  rank=1                    apply to this rank only (default: every rank)
e.g. DSFM_FAULT="nan_at=5,rank=1".

The hooks live here, apart from the code they interrupt, so a reader of the trainer sees one
line per fault point and the injection logic once.
"""

from __future__ import annotations

import math
import os
import signal
import time

ENV = "DSFM_FAULT"
KILL_PHASES = ("step", "save_shards", "save_publish", "save_done")


def parse(spec: str | None) -> dict[str, str]:
    if not spec:
        return {}
    out = {}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        known = ("nan_at", "spike_at", "hang_at", "step_s", "kill_at", "rank")
        if not sep or key not in known:
            raise ValueError(f"{ENV}: cannot read {item!r} (see dsfm/testing/faults.py)")
        out[key] = value
    return out


FAULTS = parse(os.environ.get(ENV))


_fired: set[tuple[str, int]] = set()


def _steps(value: str) -> set[int]:
    out: set[int] = set()
    for part in value.split("+"):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def _armed(key: str, step: int, rank: int) -> bool:
    if key not in FAULTS or ("rank" in FAULTS and int(FAULTS["rank"]) != rank):
        return False
    if (key, step) in _fired or step not in _steps(FAULTS[key].split(":")[0]):
        return False
    _fired.add((key, step))
    return True


def loss_factor(step: int, rank: int) -> float:
    """1.0 unless a NaN or spike is injected into this step's loss."""
    if not FAULTS:
        return 1.0
    if _armed("nan_at", step, rank):
        return math.nan
    return 50.0 if _armed("spike_at", step, rank) else 1.0


def at_step_start(step: int, rank: int) -> None:
    """hang_at and step_s."""
    if not FAULTS:
        return
    if "step_s" in FAULTS:
        time.sleep(float(FAULTS["step_s"]))
    if _armed("hang_at", step, rank):
        while True:  # a collective that never returns, as far as the other ranks can tell
            time.sleep(3600)


def maybe_kill(step: int, rank: int, phase: str) -> None:
    if (
        FAULTS
        and FAULTS.get("kill_at", ":").split(":")[1] == phase
        and _armed("kill_at", step, rank)
    ):
        os.kill(os.getpid(), signal.SIGKILL)
