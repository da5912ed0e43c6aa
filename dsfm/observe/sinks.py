"""Metric sinks: where each step row goes besides RUN/metrics.jsonl, which is always written.

One class per sink (`log.sinks` in the config picks them), each with `log(row)` and
`close()`; `RunLogger` (metrics.py) fans step rows out to them, on rank 0 only. Event rows
(warnings, rollbacks, preemption) stay in metrics.jsonl and on the console.

- Train perplexity (`ppl`) sits beside val perplexity (`val_ppl`) in every sink: the
  console's status line, CSV columns, `train/ppl` and `val/ppl` scalars.
- TensorBoard and W&B share one scalar naming: `train/<key>` for a step's keys and
  `val/<key>` for an eval's (`val_loss` -> `val/loss`, a blend's `val_loss/<source>` ->
  `val/loss/<source>`); dict values are flattened to `key/<name>`; booleans and nulls are
  left out; the x axis is the optimizer step.
- CSV has one fixed header, chosen when the file is created: the first row's columns plus
  every eval column (`val_loss`, `val_ppl`, and `val_loss/<source>` per blend source), so
  a spreadsheet gets rectangular data; a row's missing cells stay empty and keys outside
  the header are dropped. A resumed run appends under the header already there.
- tensorboard and wandb are imported only when their sink is chosen (the config's resolve
  step has already said `pip install ...` if they are missing).
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from dsfm.config.schema import LOG_SINKS
from dsfm.observe.rundir import METRICS_CSV, TENSORBOARD
from dsfm.progress import Tracker, duration, eta_s

EVAL_COLUMNS = ("val_loss", "val_ppl")


def flatten(row: dict[str, Any]) -> dict[str, Any]:
    """Dict values (a blend's `epochs`) become `key/<name>` entries."""
    flat: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, dict):
            flat.update({f"{key}/{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """A step row as `train/...` and `val/...` scalars (finite numbers only)."""
    out = {}
    for key, value in flatten(row).items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            continue
        out[f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"] = float(value)
    return out


def status_line(row: dict[str, Any], max_steps: int, eta_s: float | None = None) -> str:
    parts = [
        f"step {row['step']}/{max_steps}",
        f"loss {row['loss']:.4f}" + (f" (ppl {row['ppl']:.1f})" if "ppl" in row else ""),
        f"lr {row['lr']:.2e}",
        f"gnorm {row['grad_norm']:.3f}" if row.get("grad_norm") is not None else "gnorm -",
        f"{row['tok_per_s'] / 1e3:.1f}k tok/s",
    ]
    if row.get("mfu") is not None:
        parts.append(f"mfu {100 * row['mfu']:.1f}%")
    if "val_loss" in row:
        parts.append(f"val loss {row['val_loss']:.4f} (ppl {row['val_ppl']:.1f})")
    if row["step"] < max_steps:
        parts.append(f"eta {duration(eta_s)}")
    return " | ".join(parts)


class ConsoleSink:
    """The progress bar (drawn only on a terminal) and a status line every `log_every` steps
    and at the last step; off a terminal the status lines are the progress, so they carry
    the ETA too: this invocation's mean time per step times the steps left (evals and
    saves included, as they will recur)."""

    def __init__(self, console: Console, total_steps: int, start_step: int, log_every: int):
        self.console, self.total_steps, self.log_every = console, total_steps, log_every
        self.start_step, self.start = start_step, time.monotonic()
        self.progress = Tracker(console=console, plain=False)
        self.progress.start()
        self.task = self.progress.add_task("train", total_steps, "steps")
        self.progress.update(self.task, completed=start_step)

    def log(self, row: dict[str, Any]) -> None:
        step = row["step"]
        detail = f"loss {row['loss']:.3f} lr {row['lr']:.2e} {row['tok_per_s'] / 1e3:.1f}k tok/s"
        self.progress.update(self.task, completed=step, detail=detail)
        if self.log_every and (step % self.log_every == 0 or step == self.total_steps):
            elapsed = time.monotonic() - self.start
            eta = eta_s(step - self.start_step, self.total_steps - self.start_step, elapsed)
            line = status_line(row, self.total_steps, eta)
            self.console.print(line, markup=False, soft_wrap=True)

    def close(self) -> None:
        self.progress.stop()


class CsvSink:
    """RUN/metrics.csv with one fixed header (see the module docstring)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / METRICS_CSV
        self.columns: list[str] | None = None
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, newline="") as f:
                self.columns = next(csv.reader(f))
        self.file = open(self.path, "a", newline="")
        self.writer: csv.DictWriter | None = None

    def log(self, row: dict[str, Any]) -> None:
        flat = flatten(row)
        if self.writer is None:
            new = self.columns is None
            if new:
                sources = list(row["epochs"]) if isinstance(row.get("epochs"), dict) else []
                extra = [*EVAL_COLUMNS, *(f"val_loss/{s}" for s in sources)]
                self.columns = [k for k in flat if k not in extra] + extra
            self.writer = csv.DictWriter(self.file, self.columns, restval="", extrasaction="ignore")
            if new:
                self.writer.writeheader()
        self.writer.writerow({k: "" if v is None else v for k, v in flat.items()})
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardSink:
    """Event files in RUN/tensorboard/ (`tensorboard --logdir RUN/tensorboard`)."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / TENSORBOARD), flush_secs=10)

    def log(self, row: dict[str, Any]) -> None:
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, global_step=row["step"])

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A W&B run under RUN/wandb/ with the resolved config; offline mode needs no network
    (`wandb sync RUN/wandb/offline-run-*` uploads it later). Each invocation is a new W&B
    run; W&B drops rows whose step goes back (after a rollback) with a warning of its own."""

    def __init__(self, run_dir: Path, project: str | None, mode: str, config: dict[str, Any]):
        import wandb

        self.run = wandb.init(
            project=project or run_dir.resolve().name,
            name=run_dir.resolve().name,
            dir=str(run_dir),
            mode=mode,
            config=config,
        )

    def log(self, row: dict[str, Any]) -> None:
        self.run.log(scalars(row), step=row["step"])

    def close(self) -> None:
        self.run.finish()


def open_sinks(
    names: list[str],
    run_dir: Path,
    console: Console,
    total_steps: int,
    start_step: int,
    log_every: int,
    wandb_project: str | None = None,
    wandb_mode: str = "offline",
    config: dict[str, Any] | None = None,
) -> list[Any]:
    """The chosen sinks, in the order named (names were checked by the config)."""
    sinks: list[Any] = []
    for name in names:
        if name == "console":
            sinks.append(ConsoleSink(console, total_steps, start_step, log_every))
        elif name == "csv":
            sinks.append(CsvSink(run_dir))
        elif name == "tensorboard":
            sinks.append(TensorBoardSink(run_dir))
        elif name == "wandb":
            sinks.append(WandbSink(run_dir, wandb_project, wandb_mode, config or {}))
        else:
            raise ValueError(f"unknown sink {name!r}; known sinks: {', '.join(LOG_SINKS)}")
    return sinks
