"""Watching a run: health warnings from the metrics rows, and early stopping on val loss.

Design choices:
- `Monitor` sees only the step rows that go to metrics.jsonl, so its rules are plain
  Python over numbers and are tested on synthetic series; it never touches torch.
- A warning belongs to an episode: it is raised when its condition starts to hold and
  not again until the condition has cleared once. A slow hour prints one line, not 3,600.
- Thresholds are constants, not config knobs: they are generous on purpose (a warning
  that cries wolf gets ignored), and the windows grow with the run (see `Monitor.window`)
  so a long run's slow late progress does not look like a plateau.
- `EarlyStopping` keeps the best val loss that counted (better by >= min_delta) and the
  evals since; it lives in the checkpoint client state, so a resumed run counts on and
  an early-stopped run stays stopped. Every rank holds one and feeds it the all-reduced
  val loss, so every rank stops at the same eval.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any

from dsfm.observe.numbers import is_finite

WINDOW = 100
"Shortest window in steps: loss plateau compares two; grad-norm and tok/s medians span one."
PLATEAU_CLEAR = 0.01
"A plateau warning ends once the loss falls this much (relative) window over window."
GRAD_FACTOR = 10.0
"A grad norm this many times its running median is exploding."
GRAD_MIN_HISTORY = 5
"Finite grad norms seen before the explosion rule judges."
SLOW_FRACTION = 0.5
"Throughput below this fraction of its running median is a drop."
SLOW_RECENT = 5
"The drop is judged on the median of this many recent steps, so one hiccup is not one."
WARMUP_ROWS = 5
"First steps of a process left out of throughput (allocator, caches, compilation)."
OVERFIT_EVALS = 3
"Val loss rising at this many evals in a row (with train loss falling) is overfitting."


@dataclass
class Alert:
    step: int
    kind: str
    message: str

    def row(self) -> dict[str, Any]:
        """As logged in metrics.jsonl."""
        return {"step": self.step, "event": "warning", "kind": self.kind, "message": self.message}


class Monitor:
    """Feed it every step row (`observe`); it returns the warnings that start now."""

    def __init__(self, warmup_steps: int, window: int = WINDOW):
        self.warmup_steps, self.min_window = warmup_steps, window
        self.active: set[str] = set()  # kinds whose episode is on
        self.loss_sums = [0.0]  # prefix sums of the finite train losses seen
        self.grad_norms: deque[float] = deque(maxlen=window)
        self.tok_per_s: deque[float] = deque(maxlen=window + SLOW_RECENT)
        self.rows_seen = 0
        self.since_eval: list[float] = []  # train losses since the last eval
        self.evals: list[tuple[float, float]] = []  # (val loss, mean train loss before it)

    def window(self, n_losses: int) -> int:
        """Plateau window: a tenth of the losses seen (at least `min_window`). Loss falls
        roughly as a power of the step, so windows proportional to the step see about the
        same relative drop early and late, while noise averages out."""
        return max(self.min_window, n_losses // 10)

    def observe(self, row: dict[str, Any]) -> list[Alert]:
        step = row["step"]
        self.rows_seen += 1
        found: dict[str, str] = {}
        if is_finite(row.get("loss")) and not row.get("skipped"):
            self.loss_sums.append(self.loss_sums[-1] + row["loss"])
            self.since_eval.append(row["loss"])
        for rule in (self._plateau, self._grad_norm, self._throughput):
            kind_message = rule(row)
            if kind_message:
                found[kind_message[0]] = kind_message[1]
        if is_finite(row.get("val_loss")):
            overfit = self._overfit(row["val_loss"])
            if overfit:
                found["overfitting"] = overfit
            else:
                self.active.discard("overfitting")  # only an eval can clear it
        for kind in ("loss_plateau", "grad_norm", "throughput"):
            if kind not in found:
                self.active.discard(kind)
        alerts = [Alert(step, k, m) for k, m in found.items() if k not in self.active]
        self.active |= set(found)
        return alerts

    def _plateau(self, row: dict[str, Any]) -> tuple[str, str] | None:
        n = len(self.loss_sums) - 1
        w = self.window(n)
        if row["step"] < self.warmup_steps + 2 * w or n < 2 * w:
            return None
        s = self.loss_sums
        last, before = (s[n] - s[n - w]) / w, (s[n - w] - s[n - 2 * w]) / w
        # Once warned, only a clear fall ends the episode: noise on a flat line would else
        # re-arm it every few steps.
        margin = PLATEAU_CLEAR if "loss_plateau" in self.active else 0.0
        if last < before * (1 - margin):
            return None
        return "loss_plateau", (
            f"train loss has not decreased over the last {2 * w} steps (mean {before:.4f} "
            f"then {last:.4f}); lower optim.lr, or check the data (shuffled? repeated?)"
        )

    def _grad_norm(self, row: dict[str, Any]) -> tuple[str, str] | None:
        norm = row.get("grad_norm")
        if not is_finite(norm):
            if norm is None and not self.grad_norms:
                return None  # no norm reported at all (nothing to compare with)
            return "grad_norm", (
                "grad norm is not finite; lower optim.lr, keep optim.grad_clip on, prefer "
                "bf16 over fp16, and check the data near this step"
            )
        history = list(self.grad_norms)
        self.grad_norms.append(norm)
        if len(history) < GRAD_MIN_HISTORY:
            return None
        median = statistics.median(history)
        if median <= 0 or norm <= GRAD_FACTOR * median:
            return None
        return "grad_norm", (
            f"grad norm {norm:.3g} is {norm / median:.0f}x its running median {median:.3g}; "
            "lower optim.lr (or the warmup's peak), keep optim.grad_clip on, check the data"
        )

    def _throughput(self, row: dict[str, Any]) -> tuple[str, str] | None:
        # tok_per_s times the train step alone (not eval, sampling or saving), so only the
        # first steps of a process need leaving out.
        if self.rows_seen <= WARMUP_ROWS or not is_finite(row.get("tok_per_s")):
            return None
        self.tok_per_s.append(row["tok_per_s"])
        values = list(self.tok_per_s)
        older, recent = values[:-SLOW_RECENT], values[-SLOW_RECENT:]
        if len(older) < 2 * SLOW_RECENT:
            return None
        now, usual = statistics.median(recent), statistics.median(older)
        if now >= SLOW_FRACTION * usual:
            return None
        return "throughput", (
            f"throughput fell to {now:,.0f} tok/s from a median of {usual:,.0f}; check for "
            "other jobs on the machine, data loading or disk I/O (checkpoints, logs)"
        )

    def _overfit(self, val_loss: float) -> str | None:
        train = statistics.fmean(self.since_eval) if self.since_eval else math.nan
        self.since_eval = []
        self.evals.append((val_loss, train))
        recent = self.evals[-(OVERFIT_EVALS + 1) :]
        if len(recent) <= OVERFIT_EVALS:
            return None
        vals = [v for v, _ in recent]
        rising = all(a < b for a, b in zip(vals, vals[1:]))
        train_fell = recent[-1][1] < recent[0][1]  # NaN (no train rows) compares False
        if not (rising and train_fell):
            return None
        return (
            f"val loss rose at {OVERFIT_EVALS} evals in a row ({vals[0]:.4f} -> {vals[-1]:.4f}) "
            "while train loss fell: overfitting; use more data, or regularize (model.dropout, "
            "optim.weight_decay), or stop at the best checkpoint (eval.patience)"
        )


class EarlyStopping:
    """Stop after `patience` evals in a row without beating the best by `min_delta`."""

    def __init__(self, patience: int, min_delta: float):
        self.patience, self.min_delta = patience, min_delta
        self.best, self.best_step, self.bad_evals = math.inf, 0, 0
        self.reason: str | None = None  # set once it fires

    @property
    def stopped(self) -> bool:
        """Fired (now or before a restart); patience 0 on a restart trains on regardless."""
        return self.reason is not None and self.patience > 0

    def update(self, val_loss: float, step: int) -> bool:
        """Count this eval; True when it ends the run (never with patience 0)."""
        if not self.patience or self.stopped:
            return self.stopped
        if val_loss < self.best - self.min_delta:  # the first eval always beats inf
            self.best, self.best_step, self.bad_evals = val_loss, step, 0
            return False
        self.bad_evals += 1
        if self.bad_evals >= self.patience:
            self.reason = (
                f"val loss did not improve on {self.best:.4f} (step {self.best_step}) by "
                f"eval.min_delta={self.min_delta:g} for {self.bad_evals} evals "
                f"(eval.patience={self.patience})"
            )
        return self.stopped

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
            "reason": self.reason,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step = state["best"], state["best_step"]
        self.bad_evals, self.reason = state["bad_evals"], state["reason"]
