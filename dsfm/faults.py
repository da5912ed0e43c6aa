"""Bad-step policy (non-finite loss, loss spikes) and the test-only fault-injection hook.

What DeepSpeed 0.19.8 does with a non-finite gradient norm (read from its source):
ZeRO-1/2 skip the update when the norm is inf/NaN in fp32, and in bf16 while
`bf16.check_grad_overflow` is true (its default); ZeRO-3 always skips; ZeRO-0 with bf16 goes
through BF16_Optimizer, which skips too; fp16 skips through dynamic loss scaling. A skipped
update leaves weights and optimizer moments alone, does not advance the LR schedule and
counts in `engine.skipped_steps`. Only ZeRO-0 in fp32 hands the NaN to torch's AdamW and
corrupts the weights; `engine.step` closes that hole.

So the policy never touches engine internals: when the step must be skipped (a non-finite
loss on any rank, or a spike with `train.spike_skip`), the trainer back-propagates the last
micro-batch's loss times NaN, and DeepSpeed's own overflow path discards the accumulated
gradients on every rank alike. The decision is taken from the loss all-reduce that already
runs each step, so every rank decides the same. The LR schedule does not advance on a skipped
step (it counts applied updates, as in Megatron and DeepSpeed fp16); the step counter and
the data do, so training moves past the offending batch. After `train.max_bad_steps`
consecutive bad steps the trainer rolls back to the newest checkpoint older than the streak
and keeps the data position (PaLM's recipe: restart before the spike, skip its batches).

Fault injection for tests: ONE environment variable, read once at import; every hook below
returns at once when it is unset. Comma-separated `key=value` items:
  nan_at=5 | nan_at=3+6-8   multiply the loss by NaN at these steps (1-based, inclusive);
                            each step fires once per process, so after a rollback the
                            replayed step numbers see fresh data, as the trainer intends
  spike_at=9                multiply the loss by 50 at this step
  hang_at=3                 sleep forever at the start of this step
  kill_at=6:PHASE           SIGKILL this process at step 6 in PHASE: step (mid-step, after the
                            first backward), save_shards (after the engine wrote its files,
                            before the tag is published), save_publish (rank 0 only:
                            after the rename, before `latest`), save_done (after `latest`)
  enospc_at=4               saving the checkpoint of step 4 fails with ENOSPC
  rank=1                    apply to this rank only (default: every rank)
e.g. DSFM_FAULT="nan_at=5,rank=1".
"""

from __future__ import annotations

import errno
import math
import os
import signal
import time
from collections import deque
from dataclasses import dataclass

ENV = "DSFM_FAULT"
KILL_PHASES = ("step", "save_shards", "save_publish", "save_done")


def parse(spec: str | None) -> dict[str, str]:
    if not spec:
        return {}
    out = {}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in ("nan_at", "spike_at", "hang_at", "kill_at", "enospc_at", "rank"):
            raise ValueError(f"{ENV}: cannot read {item!r} (see dsfm/faults.py)")
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


def maybe_hang(step: int, rank: int) -> None:
    if FAULTS and _armed("hang_at", step, rank):
        while True:  # a collective that never returns, as far as the other ranks can tell
            time.sleep(3600)


def maybe_kill(step: int, rank: int, phase: str) -> None:
    if (
        FAULTS
        and FAULTS.get("kill_at", ":").split(":")[1] == phase
        and _armed("kill_at", step, rank)
    ):
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_enospc(step: int, rank: int) -> None:
    if FAULTS and _armed("enospc_at", step, rank):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "(injected by DSFM_FAULT)")


# ------------------------------------------------------------------ the policy


@dataclass
class Verdict:
    skip: bool  # discard this step's update
    event: str | None  # "nonfinite" or "spike" (logged), None for a normal step


class LossGuard:
    """Decides, from the all-reduced loss, whether a step is bad; tracks the bad streak.

    A spike is a loss above mean + `sigma` * std of the last `window` good losses, judged
    once `min_history` are known (a handful: the band is wide while the history is short).
    """

    def __init__(
        self, spike_sigma: float, spike_skip: bool, window: int = 50, min_history: int = 8
    ) -> None:
        self.min_history = min_history
        self.sigma, self.spike_skip = spike_sigma, spike_skip
        self.history: deque[float] = deque(maxlen=window)
        self.bad_streak = 0
        self.streak_start: int | None = None  # step of the first bad step in the streak
        self.total_bad = 0

    def judge(self, loss: float) -> Verdict:
        if not math.isfinite(loss):
            return Verdict(skip=True, event="nonfinite")
        if self.sigma > 0 and len(self.history) >= max(2, self.min_history):
            mean = sum(self.history) / len(self.history)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / len(self.history))
            if loss > mean + self.sigma * std:
                return Verdict(skip=self.spike_skip, event="spike")
        return Verdict(skip=False, event=None)

    def record(self, step: int, loss: float, applied: bool, spike: bool = False) -> None:
        """After the step: extend the streak if no update was applied, else reset it.

        Spikes never enter the history, so one outlier does not widen the band for the next.
        """
        if applied:
            self.bad_streak, self.streak_start = 0, None
            if math.isfinite(loss) and not spike:
                self.history.append(loss)
            return
        self.total_bad += 1
        self.bad_streak += 1
        if self.streak_start is None:
            self.streak_start = step
