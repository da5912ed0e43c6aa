"""Metrics: one JSON object per line in RUN/metrics.jsonl, fanned out to the chosen sinks, MFU.

Only rank 0 writes or draws; other ranks get a logger whose methods do nothing, so the
trainer never branches on rank for logging. metrics.jsonl is always written (`rundir.py`);
the console (progress bar, status lines), CSV, TensorBoard and W&B are sinks (`sinks.py`).
Step rows go to every sink and through the health monitor (`monitor.py`), whose warnings
are logged as event rows and printed in yellow whatever the sinks. MFU uses the PaLM
FLOPs-per-token formula against the accelerator's dense bf16 peak (`dsfm.gpus`); it is null
where the peak is unknown (CPU).

What a newcomer needs to read the numbers is printed with them: train perplexity beside
val perplexity, the loss of a model that knows nothing (`uniform_baseline`) at the start,
and each eval's sample generations (`sample`), one truncated line per prompt.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from dsfm.config.schema import LogConfig
from dsfm.observe import rundir, summary
from dsfm.observe.monitor import Monitor
from dsfm.observe.sinks import open_sinks

SAMPLE_CHARS = 120  # a sample's console line; samples.jsonl keeps the whole text


def uniform_baseline(vocab_size: int) -> str:
    """What the first loss is judged against: uniform guessing over the vocabulary."""
    ln_v = math.log(vocab_size)
    return (
        f"baseline: a model that knows nothing scores ln V = ln {vocab_size} = {ln_v:.2f} "
        f"(ppl {vocab_size}); the first loss should be near it, and every nat below is learned"
    )


def sample_line(row: dict[str, Any], limit: int = SAMPLE_CHARS) -> str:
    """`sample @ step N: 'prompt' -> 'completion'` on one line (quoted, so newlines and
    spaces show), the completion cut to `limit` characters."""
    text = row["completion"]
    cut = text if len(text) <= limit else text[:limit] + "…"
    return f"sample @ step {row['step']}: {row['prompt']!r} -> {cut!r}"


def mfu(
    tokens_per_s: float, flops_per_token: float, n_devices: int, peak: float | None
) -> float | None:
    if peak is None:
        return None
    return tokens_per_s * flops_per_token / (peak * n_devices)


class RunLogger:
    """JSONL rows, the chosen sinks and the health monitor; a no-op off rank 0."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        total_steps: int,
        start_step: int = 0,
        *,
        log_cfg: LogConfig | None = None,
        log_every: int = 10,
        warmup_steps: int = 0,
        config: dict[str, Any] | None = None,
    ):
        log_cfg = log_cfg or LogConfig()
        self.enabled, self.run_dir, self.total_steps = enabled, run_dir, total_steps
        self.console = Console(stderr=False, highlight=False)
        self.verbose = "console" in log_cfg.sinks
        self.sinks: list[Any] = []
        if not enabled:
            return
        self.metrics, self.samples = rundir.open_rows(run_dir)
        self.monitor = Monitor(warmup_steps) if log_cfg.warnings else None
        self.sinks = open_sinks(
            log_cfg, run_dir, self.console, total_steps, start_step, log_every, config
        )

    def log(self, row: dict[str, Any]) -> None:
        """Any row to metrics.jsonl; a step row (it has a loss) also to the sinks and the
        monitor, whose new warnings follow it as event rows."""
        if not self.enabled:
            return
        self._write(row)
        if "loss" not in row:
            return
        for sink in self.sinks:
            sink.log(row)
        for alert in self.monitor.observe(row) if self.monitor else []:
            self._write(alert.row())
            self.warn(f"warning at step {alert.step}: {alert.message}")

    def _write(self, row: dict[str, Any]) -> None:
        rundir.append_row(self.metrics, row)

    def sample(self, row: dict[str, Any]) -> None:
        """A generation to samples.jsonl, and with the console sink one line of it."""
        if self.enabled:
            rundir.append_row(self.samples, row)
            self.info(sample_line(row))

    def info(self, text: str) -> None:
        """Progress talk: only with the console sink."""
        if self.verbose:
            self.print(text)

    def print(self, text: str) -> None:
        """What the operator must see whatever the sinks (stops, restarts, rollbacks)."""
        if self.enabled:
            self.console.print(text, markup=False, soft_wrap=True)

    def warn(self, text: str) -> None:
        if self.enabled:
            self.console.print(Text(text, style="yellow"), soft_wrap=True)

    def finish(
        self, stop_reason: str, checkpoints: list[str], early_stop_reason: str | None = None
    ) -> dict[str, Any] | None:
        """RUN/summary.json and the summary table (also without the console sink)."""
        if not self.enabled:
            return None
        for sink in self.sinks:  # the progress bar and W&B's own closing words come first
            sink.close()
        self.sinks = []
        rows, events = rundir.read_metrics(self.run_dir)
        s = summary.compute(rows, events, self.total_steps, checkpoints, stop_reason)
        rundir.write_summary(self.run_dir, s)
        self.console.print(summary.table(s, early_stop_reason))
        return s

    def close(self) -> None:
        if not self.enabled:
            return
        for sink in self.sinks:
            sink.close()
        self.metrics.close()
        self.samples.close()
