"""A run directory on disk: the one module that names its files and reads or writes them.

    RUN/
      config.yaml        the resolved training config
      ds_config.json     the resolved DeepSpeed config
      metrics.jsonl      one JSON object per step (and event rows: they have no "loss")
      samples.jsonl      generations from eval.prompts at every eval
      summary.json       the end-of-run summary
      train.lock         held by the `dsfm train` writing here: host, pid, start time
                         (`dsfm.train.runlock`)
      tokenizer.json     the data's tokenizer (`dsfm.data.tokenizer`)
      metrics.csv        tensorboard/   wandb/              what the chosen sinks write
      wandb_run_id       the W&B run's id, so a resumed or requeued run stays one W&B run
      checkpoints/       tags, `latest` (their layout: `dsfm.train.checkpoint`)
      data/              datasets prepared from `dsfm train --data RAW` (`dsfm.data.cache`)
      eval/              benchmark results of its tags (`dsfm eval --tasks`); a plain
                         checkpoint's go to eval/ beside it

Design choices:
- Paths only and the plain files' reading and writing; no torch, so `dsfm runs` and
  `dsfm plot` stay instant. The configs arrive as dicts: this module does not know their
  schema.
- metrics.jsonl is append-only: a resumed or rolled-back run appends, and a step logged
  again replaces every row from that step on when read (`read_metrics`), so the history is
  monotone in step and a dead branch's tail never lingers. A half-written last line (a
  run writing right now) is skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TextIO

import yaml

CONFIG = "config.yaml"
DS_CONFIG = "ds_config.json"
METRICS = "metrics.jsonl"
SAMPLES = "samples.jsonl"
SUMMARY = "summary.json"
METRICS_CSV = "metrics.csv"
TENSORBOARD = "tensorboard"  # W&B makes RUN/wandb/ itself
WANDB_RUN_ID = "wandb_run_id"
CHECKPOINTS = "checkpoints"
DATA = "data"
EVAL = "eval"
LOCK = "train.lock"


def checkpoints_dir(run: str | Path) -> Path:
    return Path(run) / CHECKPOINTS


def lock_file(run: str | Path) -> Path:
    """The one-writer lock of a run directory (`dsfm.train.runlock` takes it)."""
    return Path(run) / LOCK


def data_dir(run: str | Path) -> Path:
    """Where `dsfm train --data RAW` caches the dataset it prepares, beside the run's files."""
    return Path(run) / DATA


def eval_dir(ckpt_dir: str | Path) -> Path:
    """Where results of a tag under `ckpt_dir` go: RUN/eval for a run's checkpoints dir,
    else eval/ inside `ckpt_dir` (beside a plain checkpoint's tag directory)."""
    ckpt_dir = Path(ckpt_dir)
    return ckpt_dir.parent / EVAL if ckpt_dir.name == CHECKPOINTS else ckpt_dir / EVAL


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / METRICS).is_file() or (Path(path) / CONFIG).is_file()


def write_configs(run: Path, config: dict[str, Any], ds_config: dict[str, Any]) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    (run / DS_CONFIG).write_text(json.dumps(ds_config, indent=2) + "\n")


def read_configs(run: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(training config, DeepSpeed config) as written; {} for one not written yet."""
    config = yaml.safe_load((run / CONFIG).read_text()) if (run / CONFIG).is_file() else None
    ds = json.loads((run / DS_CONFIG).read_text()) if (run / DS_CONFIG).is_file() else {}
    return config or {}, ds


def open_rows(run: Path) -> tuple[TextIO, TextIO]:
    """(metrics.jsonl, samples.jsonl) opened for appending rows with `append_row`."""
    return open(run / METRICS, "a"), open(run / SAMPLES, "a")


def append_row(file: TextIO, row: dict[str, Any]) -> None:
    file.write(json.dumps(row) + "\n")
    file.flush()


def read_metrics(run: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(step rows, event rows) of the run's metrics.jsonl (none yet: two empty lists); a
    restarted step replaces the old tail (see the module doc)."""
    path = run / METRICS
    rows: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    if not path.is_file():
        return rows, events
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):  # a row being written right now
                break
            raise ValueError(f"{path}:{i} is not JSON ({e}); remove or fix that line") from None
        if "event" in row or "loss" not in row:
            events.append(row)
            continue
        while rows and rows[-1]["step"] >= row["step"]:
            rows.pop()
        rows.append(row)
    return rows, events


def metrics_age_s(run: Path, now: float) -> float | None:
    """Seconds since metrics.jsonl was last written; None before the first row."""
    path = run / METRICS
    return now - path.stat().st_mtime if path.is_file() else None


def write_summary(run: Path, summary: dict[str, Any]) -> None:
    (run / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")


def read_wandb_run_id(run: Path) -> str | None:
    """The W&B run id an earlier invocation of this run wrote; None if there is none."""
    path = run / WANDB_RUN_ID
    return (path.read_text().strip() or None) if path.is_file() else None


def write_wandb_run_id(run: Path, run_id: str) -> None:
    (run / WANDB_RUN_ID).write_text(run_id + "\n")
