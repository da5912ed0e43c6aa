"""`dsfm runs`: one table of every run under a directory, from what each run wrote.

`load_run` is the one reader that `dsfm runs` and `dsfm plot` share: the run's current
history of step rows and its event rows (`rundir.read_metrics`), its configs, and the
summary computed from the rows by the function that writes RUN/summary.json, so old,
still-running and restarted runs list alike. Listing imports neither torch nor deepspeed,
so it is instant.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsfm.config.deepspeed import precision, zero_stage
from dsfm.model.config import PRESETS, ModelConfig
from dsfm.model.sizes import num_params
from dsfm.observe import rundir, summary
from dsfm.observe.numbers import duration, human, is_finite
from dsfm.train import checkpoint

RUNNING_WINDOW_S = 300  # metrics.jsonl written this recently: the run is (probably) alive
SEARCH_DEPTH = 3  # runs/GROUP/NAME/... is as deep as people nest runs
SORT_KEYS = ("name", "status", "n_params", "steps", "tokens", "best_val_loss", "final_loss")
SORT_KEYS += ("tok_per_s", "elapsed_s")
LEFT_COLUMNS = ("run", "status", "model", "data", "ZeRO prec", "batch×seq")
RIGHT_COLUMNS = ("steps", "tokens", "best val (ppl)", "loss", "tok/s", "elapsed")  # numbers


@dataclass
class Run:
    path: Path
    rows: list[dict[str, Any]]  # step rows: current history, ascending step
    events: list[dict[str, Any]]  # nonfinite, spike, rollback, preempted, warning, ...
    config: dict[str, Any]  # config.yaml (resolved training config), {} if absent
    ds_config: dict[str, Any]  # ds_config.json, {} if absent
    summary: dict[str, Any] = field(default_factory=dict)


def load_run(path: str | Path) -> Run:
    """Metrics, configs and summary of one run directory."""
    p = Path(path)
    if not p.is_dir() or not rundir.is_run_dir(p):
        what = "does not exist" if not p.exists() else "is not a run directory"
        raise FileNotFoundError(
            f"{p} {what}: a run directory holds {rundir.METRICS} and {rundir.CONFIG} "
            "(the train.out_dir of `dsfm train`, e.g. runs/NAME)"
        )
    rows, events = rundir.read_metrics(p)
    config, ds_config = rundir.read_configs(p)
    run = Run(p, rows, events, config, ds_config)
    # As the trainer computes summary.json, so a running run or a restart with a raised
    # train.max_steps reads right too.
    max_steps = config.get("train", {}).get("max_steps")
    tags = checkpoint.published_tags(rundir.checkpoints_dir(p))
    run.summary = summary.compute(rows, events, max_steps, tags, _stop_reason(run))
    return run


def _stop_reason(run: Run) -> str | None:
    last_step = run.rows[-1]["step"] if run.rows else 0
    after = [e["event"] for e in run.events if e.get("step", 0) >= last_step and "event" in e]
    for reason in ("early_stop", "preempted"):
        if reason in after:
            return reason
    max_steps = run.config.get("train", {}).get("max_steps")
    return "max_steps" if max_steps and last_step >= max_steps else None


def status(run: Run, now: float | None = None) -> str:
    s, reason = run.summary, _stop_reason(run)
    steps, max_steps = s["steps"], s["max_steps"]
    if s.get("early_stopped") or reason == "early_stop":
        return f"early-stopped at {steps}"
    if max_steps and steps >= max_steps:
        return "complete"
    age = rundir.metrics_age_s(run.path, time.time() if now is None else now)
    if age is not None and age < RUNNING_WINDOW_S:
        return "running"
    if reason == "preempted":
        return f"preempted at {steps}"
    return f"stopped at {steps} of {max_steps}"


def model_label(config: dict[str, Any]) -> str:
    """The preset name when the run's shape is that preset's, else d_model×n_layers."""
    m = config.get("model", {})
    shape = (m.get("d_model"), m.get("n_layers"))
    preset = PRESETS.get(m.get("preset") or "", {})
    if preset and (preset["d_model"], preset["n_layers"]) == shape:
        return m["preset"]
    return f"{shape[0]}×{shape[1]}" if None not in shape else "?"


def n_params(run: Run) -> int | None:
    """From a checkpoint's client state (what the model really had), else from the config."""
    ckpt_dir = rundir.checkpoints_dir(run.path)
    for tag in checkpoint.published_tags(ckpt_dir):
        try:
            return int(checkpoint.client_state(ckpt_dir, tag)["n_params"])
        except (FileNotFoundError, ValueError, KeyError):
            continue
    m = run.config.get("model", {})
    if not m.get("vocab_size"):
        return None
    known = {k: v for k, v in m.items() if k in ModelConfig.__dataclass_fields__}
    return num_params(ModelConfig(**known))


def data_label(config: dict[str, Any]) -> str:
    d = config.get("data", {})
    if d.get("mix"):
        return "+".join(s.get("name") or Path(s["path"]).name for s in d["mix"])
    return Path(d["path"]).name if d.get("path") else "?"


def describe(run: Run, name: str) -> dict[str, Any]:
    """One `dsfm runs` row (also its --json object)."""
    s, ds = run.summary, run.ds_config
    best = s.get("best_val_loss")
    return {
        "name": name,
        "path": str(run.path),
        "status": status(run),
        "model": model_label(run.config),
        "n_params": n_params(run),
        "data": data_label(run.config),
        "zero_stage": zero_stage(ds) if ds else None,
        "precision": precision(ds) if ds else None,
        "global_batch": ds.get("train_batch_size"),
        "seq_len": run.config.get("train", {}).get("seq_len"),
        "steps": s["steps"],
        "max_steps": s["max_steps"],
        "tokens": s["tokens"],
        "best_val_loss": best,
        "best_val_ppl": math.exp(best) if is_finite(best) else None,
        "best_val_step": s.get("best_val_step"),
        "final_loss": s.get("final_loss"),
        "tok_per_s": s.get("tok_per_s"),
        "mfu": s.get("mfu"),
        "elapsed_s": s.get("elapsed_s"),
    }


def find_runs(root: Path, depth: int = SEARCH_DEPTH) -> list[Path]:
    """Run directories at or under root (not inside another run), sorted by path."""
    if rundir.is_run_dir(root):
        return [root]
    if depth == 0:
        return []
    found: list[Path] = []
    for child in sorted(root.iterdir()):
        if child.is_dir() and not child.name.startswith("."):
            found += find_runs(child, depth - 1)
    return found


def list_runs(dirs: list[str], sort: str = "name") -> list[dict[str, Any]]:
    """describe() of every run under dirs; names are relative to their DIR."""
    if sort not in SORT_KEYS:
        raise ValueError(f"--sort {sort}: not a column; choose one of {', '.join(SORT_KEYS)}")
    described = []
    for d in dirs:
        root = Path(d)
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a directory (pass where your runs live)")
        for path in find_runs(root):
            rel = path.name if path == root else str(path.relative_to(root))
            name = str(root / rel) if len(dirs) > 1 and path != root else rel
            described.append(describe(load_run(path), name))
    # Missing values (a run with no eval yet) sort last.
    return sorted(described, key=lambda r: (r[sort] is None, 0 if r[sort] is None else r[sort]))


def print_runs(described: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left", header_style="bold")
    for col in LEFT_COLUMNS:
        table.add_column(col)
    for col in RIGHT_COLUMNS:
        table.add_column(col, justify="right")
    for r in described:
        best = r["best_val_loss"]
        table.add_row(
            r["name"],
            r["status"],
            r["model"] + (f" {human(r['n_params'])}" if r["n_params"] else ""),
            r["data"],
            f"{r['zero_stage']} {r['precision']}" if r["precision"] else "?",
            f"{r['global_batch'] or '?'}×{r['seq_len'] or '?'}",
            f"{r['steps']}/{r['max_steps']}",
            human(r["tokens"]),
            f"{best:.4f} ({r['best_val_ppl']:.1f})" if is_finite(best) else "-",
            f"{r['final_loss']:.4f}" if is_finite(r["final_loss"]) else "-",
            human(r["tok_per_s"]),
            duration(r["elapsed_s"]),
        )
    console = Console()
    if not console.is_terminal:  # piped or logged: print the whole table, never truncate it
        console = Console(width=1000)
    console.print(table)


def runs_command(dirs: list[str], as_json: bool, sort: str) -> int:
    described = list_runs(dirs, sort=sort)
    if as_json:
        print(json.dumps(described, indent=1, ensure_ascii=False))
    elif not described:
        print(
            f"no runs under {', '.join(dirs)} (a run directory has {rundir.METRICS} or "
            f"{rundir.CONFIG}; start one with `dsfm train ... train.out_dir=runs/NAME`)"
        )
    else:
        print_runs(described, title=f"{len(described)} run(s) under {', '.join(dirs)}")
    return 0
