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
- TensorBoard also gets the resolved config, as YAML text (TEXT tab) and as hparams
  (`section.field` columns in the HPARAMS tab, to compare runs by their settings).
- W&B behaves as its users expect: each `log.wandb_*` field set in the config wins, else
  its `WANDB_*` variable, else dsfm's default (project `dsfm`, mode `offline`); the run is
  named after its directory. Its id is kept in the run directory (`rundir.WANDB_RUN_ID`)
  and passed back with `resume="allow"`, so a resumed or requeued run is one W&B run; a
  run that starts again from step 0 gets a new W&B run, as W&B drops steps that go back.
  Mode `disabled` opens no sink: nothing is imported or written.
- tensorboard and wandb are imported only when their sink is chosen (the config's resolve
  step has already said `pip install ...` if they are missing).
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from dsfm.config.schema import LOG_SINKS, LogConfig
from dsfm.observe import rundir
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
    if row.get("mem_gb") is not None:
        parts.append(f"mem {row['mem_gb']:.1f} GiB")
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


def hparams(config: dict[str, Any]) -> dict[str, Any]:
    """The nested config as flat `section.field` values TensorBoard's hparams accept (numbers,
    strings, booleans): lists and nulls as their JSON text."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in hparams(value).items()})
        elif isinstance(value, (bool, int, float, str)):
            flat[key] = value
        else:
            flat[key] = json.dumps(value)
    return flat


class TensorBoardSink:
    """Event files in RUN/tensorboard/ (`tensorboard --logdir RUN/tensorboard`): the scalars,
    and the resolved config as text and hparams at the invocation's first step."""

    def __init__(self, run_dir: Path, config: dict[str, Any] | None = None, start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        self.writer = SummaryWriter(str(run_dir / TENSORBOARD), flush_secs=10)
        if config:
            text = yaml.safe_dump(config, sort_keys=False)
            self.writer.add_text("config", f"```yaml\n{text}```", global_step=start_step)
            # the metrics named here are the HPARAMS tab's columns, read from the scalars
            metrics = {"train/loss": math.nan, "val/loss": math.nan}
            for summary in hparams_summaries(hparams(config), metrics):
                self.writer.file_writer.add_summary(summary, global_step=start_step)

    def log(self, row: dict[str, Any]) -> None:
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, global_step=row["step"])

    def close(self) -> None:
        self.writer.close()


def wandb_settings(
    log: LogConfig, run_dir: Path, environ: Mapping[str, str] = os.environ
) -> dict[str, Any]:
    """wandb.init's arguments: each field from the config when set, else its WANDB_*
    variable, else dsfm's default. They are passed explicitly (wandb.init's arguments beat
    its variables), so these rules are the whole story."""
    tags = log.wandb_tags
    if tags is None:
        tags = [t.strip() for t in environ.get("WANDB_TAGS", "").split(",") if t.strip()]
    return {
        "project": log.wandb_project or environ.get("WANDB_PROJECT") or "dsfm",
        "entity": log.wandb_entity or environ.get("WANDB_ENTITY") or None,
        "group": log.wandb_group or environ.get("WANDB_RUN_GROUP") or None,
        "tags": tags or None,
        "mode": log.wandb_mode or environ.get("WANDB_MODE") or "offline",
        "name": run_dir.resolve().name,
        "dir": str(run_dir),
    }


class WandbSink:
    """A W&B run under RUN/wandb/ with the resolved config; offline mode needs no network
    (`wandb sync RUN/wandb/offline-run-*` uploads it later). One W&B run per run directory
    (see the module docstring); W&B drops rows whose step goes back (after a rollback) with
    a warning of its own."""

    def __init__(self, run_dir: Path, settings: dict[str, Any], config: dict[str, Any],
                 start_step: int = 0):  # fmt: skip
        import wandb

        run_id = rundir.read_wandb_run_id(run_dir) if start_step > 0 else None
        self.run = wandb.init(**settings, id=run_id, resume="allow", config=config)
        rundir.write_wandb_run_id(run_dir, self.run.id)

    def log(self, row: dict[str, Any]) -> None:
        self.run.log(scalars(row), step=row["step"])

    def close(self) -> None:
        self.run.finish()


def open_sinks(
    log: LogConfig,
    run_dir: Path,
    console: Console,
    total_steps: int,
    start_step: int,
    log_every: int,
    config: dict[str, Any] | None = None,
) -> list[Any]:
    """The sinks `log.sinks` names, in its order (names were checked by the config)."""
    sinks: list[Any] = []
    for name in log.sinks:
        if name == "console":
            sinks.append(ConsoleSink(console, total_steps, start_step, log_every))
        elif name == "csv":
            sinks.append(CsvSink(run_dir))
        elif name == "tensorboard":
            sinks.append(TensorBoardSink(run_dir, config, start_step))
        elif name == "wandb":
            settings = wandb_settings(log, run_dir)
            if settings["mode"] != "disabled":
                sinks.append(WandbSink(run_dir, settings, config or {}, start_step))
        else:
            raise ValueError(f"unknown sink {name!r}; known sinks: {', '.join(LOG_SINKS)}")
    return sinks
