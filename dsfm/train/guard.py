"""The bad-step policy: which steps to skip (non-finite loss, loss spikes) and when to roll back.

What DeepSpeed 0.19.8 does with a non-finite gradient norm (read from its source):
ZeRO-1/2 skip the update when the norm is inf/NaN in fp32, and in bf16 while
`bf16.check_grad_overflow` is true (its default); ZeRO-3 always skips; ZeRO-0 with bf16 goes
through BF16_Optimizer, which skips too; fp16 skips through dynamic loss scaling. A skipped
update leaves weights and optimizer moments alone, does not advance the LR schedule and
counts in `engine.skipped_steps`. Only ZeRO-0 in fp32 hands the NaN to torch's AdamW and
would corrupt the weights; `engine.step` skips it on the device.

So the policy never touches engine internals: when the step must be skipped (a non-finite
loss on any rank, or a spike with `train.spike_skip`), the trainer back-propagates the last
micro-batch's loss times NaN, and DeepSpeed's own overflow path discards the accumulated
gradients on every rank alike. The decision is taken from the loss all-reduce that already
runs each step, so every rank decides the same, and it is taken on the device
(`judge_on_device`): the GPU never waits for the host to decide. The LR schedule does not
advance on a skipped step (it counts applied updates, as in Megatron and DeepSpeed fp16);
the step counter and the data do, so training moves past the offending batch. After
`train.max_bad_steps` consecutive bad steps the trainer rolls back to the newest checkpoint
older than the streak and keeps the data position (PaLM's recipe: restart before the spike,
skip its batches).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch


@dataclass
class Verdict:
    skip: bool  # discard this step's update
    event: str | None  # "nonfinite" or "spike" (logged), None for a normal step


class LossGuard:
    """Decides, from the all-reduced loss, whether a step is bad; tracks the bad streak.

    A spike is a loss above mean + `sigma` * std of the last `window` good losses, judged
    once `min_history` are known (a handful: the band is wide while the history is short).
    `max_bad_steps` bad steps in a row make a rollback due.
    """

    def __init__(
        self,
        spike_sigma: float,
        spike_skip: bool,
        window: int = 50,
        min_history: int = 8,
        max_bad_steps: int = 5,
    ) -> None:
        self.min_history, self.max_bad_steps = min_history, max_bad_steps
        self.sigma, self.spike_skip = spike_sigma, spike_skip
        self.history: deque[float] = deque(maxlen=window)
        self.bad_streak = 0
        self.streak_start: int | None = None  # step of the first bad step in the streak
        self.total_bad = 0

    def spike_threshold(self) -> float:
        """Losses above this are spikes (inf while spikes are off or the history is short)."""
        if self.sigma <= 0 or len(self.history) < max(2, self.min_history):
            return math.inf
        mean = sum(self.history) / len(self.history)
        std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / len(self.history))
        return mean + self.sigma * std

    def judge(self, loss: float) -> Verdict:
        if not math.isfinite(loss):
            return Verdict(skip=True, event="nonfinite")
        if loss > self.spike_threshold():
            return Verdict(skip=self.spike_skip, event="spike")
        return Verdict(skip=False, event=None)

    def judge_on_device(self, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(skip, spike) of a 0-d loss tensor by `judge`'s rule, computed where the loss lives,
        so deciding needs no host read; the trainer reads both with the step's other numbers."""
        spike = loss > self.spike_threshold()  # False for NaN
        skip = ~torch.isfinite(loss) | (spike & self.spike_skip)
        return skip, spike

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

    @property
    def rollback_due(self) -> bool:
        return self.bad_streak >= self.max_bad_steps

    def end_streak(self) -> None:
        """After a rollback: the steps that follow start a new count."""
        self.bad_streak, self.streak_start = 0, None
