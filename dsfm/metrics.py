"""Metrics: one JSON object per line in RUN/metrics.jsonl, a rich progress bar, MFU.

Only rank 0 writes or draws; other ranks get a logger whose methods do nothing, so the
trainer never branches on rank for logging. MFU uses the PaLM FLOPs-per-token formula
against the accelerator's dense bf16 peak; it is null where the peak is unknown (CPU).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from dsfm.gpus import PEAK_FLOPS


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def mfu(
    tokens_per_s: float, flops_per_token: float, n_devices: int, peak: float | None
) -> float | None:
    if peak is None:
        return None
    return tokens_per_s * flops_per_token / (peak * n_devices)


def finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


class RunLogger:
    """JSONL rows plus a rich progress bar with a status line; a no-op off rank 0."""

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int = 0):
        self.enabled = enabled
        self.console = Console(stderr=False, highlight=False)
        self.progress: Progress | None = None
        if not enabled:
            return
        self.metrics = open(run_dir / "metrics.jsonl", "a")
        self.samples = open(run_dir / "samples.jsonl", "a")
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
            disable=not self.console.is_terminal,
        )
        self.task = self.progress.add_task(
            "train", total=total_steps, completed=start_step, status=""
        )
        self.progress.start()

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()

    def sample(self, row: dict[str, Any]) -> None:
        if self.enabled:
            self.samples.write(json.dumps(row) + "\n")
            self.samples.flush()

    def advance(self, step: int, status: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, status=status)

    def print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, markup=False, soft_wrap=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.stop()
        self.metrics.close()
        self.samples.close()
