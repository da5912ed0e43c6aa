"""The learning-rate schedule: the LR of update k as a pure function (no torch, no DeepSpeed).

The trainer sets `lr_at(step)` on every parameter group before each optimizer step
(`engine.set_lr`), so the LR depends on the trainer's step counter alone: a resumed or
rolled-back run (the counter comes back with the checkpoint) uses the same LR as the
uninterrupted one, and a skipped update still consumes its place in the schedule, so the
floor is reached at train.max_steps whatever was skipped.

With N = train.max_steps, W = schedule.warmup_steps, peak = optim.lr and
floor = peak * min_lr_ratio, update k (0-based, k = 0 .. N-1) uses:
- warmup, k < W:   peak * (k+1) / W  (k = W-1 is exactly the peak);
- then, from the last update at the peak a = max(W-1, 0), with progress
  p = (k - a) / (N-1 - a) (p = 1 when no update is left after a):
  cosine    floor + (peak - floor) * (1 + cos(pi * p)) / 2
  linear    peak - (peak - floor) * p
  constant  peak (min_lr_ratio is not used)
  wsd       peak until update N-1-D, then linear to the floor over the last D updates,
            D = `ScheduleConfig.decay_steps(N)` (decay_fraction of N, at least 1)
so every decaying kind reaches the floor exactly at the last update, k = N-1.
"""

from __future__ import annotations

import math

from dsfm.config.schema import ScheduleConfig


def lr_at(k: int, s: ScheduleConfig, peak: float, max_steps: int) -> float:
    """The LR of update `k` (0-based) of a `max_steps`-update run peaking at `peak`."""
    if k < s.warmup_steps:
        return peak * ((k + 1) / s.warmup_steps)  # the fraction first: exactly 1 at the end
    floor = peak * s.min_lr_ratio
    last = max_steps - 1
    k = min(k, last)  # past the end (not reached by training): stay at the floor
    if s.kind == "constant":
        return peak
    if s.kind == "wsd":
        start = last - s.decay_steps(max_steps)  # the last update at the peak
        return peak if k <= start else peak - (peak - floor) * (k - start) / (last - start)
    a = max(s.warmup_steps - 1, 0)
    p = min(1.0, (k - a) / (last - a)) if last > a else 1.0
    if s.kind == "linear":
        return peak - (peak - floor) * p
    if s.kind == "cosine":
        return floor + (peak - floor) * (1 + math.cos(math.pi * p)) / 2
    raise ValueError(f"unknown schedule.kind {s.kind!r}")
