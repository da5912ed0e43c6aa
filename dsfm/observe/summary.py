"""The end-of-run summary: the numbers of RUN/summary.json and a table on the console.

Computed from metrics.jsonl, not from the process's memory, so it describes the whole run
across restarts (rows are appended by every invocation; elapsed_s and tokens are the
run's running totals). Keys (read by `dsfm runs`): steps, max_steps, tokens, elapsed_s,
tok_per_s (tokens / elapsed_s: the mean over the run, weighted by time), best_val_loss,
best_val_step, final_loss, mfu (mean over steps; null where the peak is unknown, as on
CPU), checkpoints (tags on disk), warnings (count), early_stopped, stop_reason (max_steps,
stop_at, early_stop or preempted). No torch here.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from rich.table import Table

from dsfm.observe.numbers import duration, finite_or_none, is_finite
from dsfm.observe.rundir import METRICS

STOP_REASONS = ("max_steps", "stop_at", "early_stop", "preempted")


def compute(
    steps: list[dict[str, Any]],
    events: list[dict[str, Any]],
    max_steps: int | None,
    checkpoints: list[str],
    stop_reason: str | None,
) -> dict[str, Any]:
    """From step rows (the current history, as `rundir.read_metrics` returns) and event rows."""
    evals = [r for r in steps if is_finite(r.get("val_loss"))]
    best = min(evals, key=lambda r: r["val_loss"]) if evals else None
    last = steps[-1] if steps else {}
    elapsed = last.get("elapsed_s") or 0.0
    mfus = [r["mfu"] for r in steps if is_finite(r.get("mfu"))]
    return {
        "steps": last.get("step", 0),
        "max_steps": max_steps,
        "tokens": last.get("tokens", 0),
        "elapsed_s": elapsed,
        "tok_per_s": last.get("tokens", 0) / elapsed if elapsed else None,
        "best_val_loss": best["val_loss"] if best else None,
        "best_val_step": best["step"] if best else None,
        "final_loss": finite_or_none(last.get("loss")),
        "mfu": statistics.fmean(mfus) if mfus else None,
        "checkpoints": checkpoints,
        "warnings": sum(e.get("event") == "warning" for e in events),
        "early_stopped": stop_reason == "early_stop",
        "stop_reason": stop_reason,
    }


def table(summary: dict[str, Any], early_stop_reason: str | None = None) -> Table:
    s = summary
    t = Table(title="run summary", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    best = (
        f"{s['best_val_loss']:.4f} (ppl {math.exp(min(s['best_val_loss'], 700)):.2f}) "
        f"at step {s['best_val_step']}"
        if s["best_val_loss"] is not None
        else "n/a (no eval)"
    )
    rows = [
        ("steps", f"{s['steps']} / {s['max_steps']}"),
        ("tokens", f"{s['tokens']:,}"),
        ("wall time", f"{duration(s['elapsed_s'])} in train steps (eval and saving not counted)"),
        ("mean tok/s", f"{s['tok_per_s']:,.0f}" if s["tok_per_s"] else "n/a"),
        ("best val loss", best),
        ("final train loss", f"{s['final_loss']:.4f}" if s["final_loss"] is not None else "n/a"),
        ("MFU", f"{100 * s['mfu']:.1f}%" if s["mfu"] is not None else "n/a"),
        ("checkpoints", ", ".join(s["checkpoints"]) or "none"),
        ("warnings", str(s["warnings"])),
        (
            "early stop",
            f"yes: {early_stop_reason or f'see {METRICS}'}" if s["early_stopped"] else "no",
        ),
        ("stopped by", s["stop_reason"]),
    ]
    for key, value in rows:
        t.add_row(key, value)
    return t
