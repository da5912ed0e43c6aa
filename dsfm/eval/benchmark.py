"""Standard benchmarks through lm-evaluation-harness: `dsfm eval CKPT --tasks a,b`.

Design choices:
- lm_eval is an optional extra (`dsfm[eval]`): it is imported here only when asked for,
  and its absence is one error naming the install, before any weights are read. Task
  names are checked against its task index (plus `--include-path`) before loading too.
- The model is dsfm's own (`harness.DsfmLM`), so every tag `dsfm generate` reads can be
  benchmarked without an export.
- Results go beside the checkpoint (`observe.rundir.eval_dir`): `<tag>_<tasks>.json` with
  lm_eval's results, versions, n-shot and configs (not the per-document samples), and
  `<tag>_<tasks>.md` with lm_eval's own table; the terminal gets the same numbers as a rich
  table.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from dsfm.interop.weights import load_model
from dsfm.observe.rundir import eval_dir
from dsfm.progress import Tracker
from dsfm.train import checkpoint

INSTALL = "pip install 'dsfm[eval]'"
SAVED_KEYS = ("results", "groups", "group_subtasks", "versions", "n-shot", "higher_is_better")
SAVED_KEYS += ("n-samples", "configs")


def task_manager(include_path: str | None) -> Any:
    """lm_eval's TaskManager (its tasks plus `include_path`'s); one error if lm_eval is absent."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ValueError(
            f"`dsfm eval --tasks` runs lm-evaluation-harness, which is not installed ({e}); "
            f"install it with `{INSTALL}`"
        ) from None
    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"--include-path {include_path} is not a directory of task YAMLs")
    return TaskManager(include_path=include_path)


def parse_tasks(tasks: str, manager: Any) -> list[str]:
    """The comma-separated names, each known to `manager` (a task, group or tag, or a glob)."""
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise ValueError("--tasks is empty; name tasks, e.g. --tasks hellaswag,arc_easy")
    unknown = [n for n in names if not manager.match_tasks([n])]
    if unknown:
        raise ValueError(
            f"unknown task(s) {', '.join(unknown)}; `lm-eval ls tasks` lists lm_eval's tasks "
            f"(your own YAML tasks: add --include-path DIR)"
        )
    return names


def run_benchmarks(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    manager: Any,
    *,
    limit: float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    log_samples: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """lm_eval's `simple_evaluate` on dsfm's model; its result dict."""
    from lm_eval import evaluator

    from dsfm.eval.harness import DsfmLM

    lm = DsfmLM(model, tokenizer, batch_size=batch_size, progress=progress)
    return evaluator.simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=int(limit) if limit is not None and limit >= 1 else limit,
        task_manager=manager,
        log_samples=log_samples,
        bootstrap_iters=0 if limit is not None else 100_000,  # a quick look needs no CIs
    )


def result_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    """(task, filter, n-shot, metric, value, stderr) per reported number, as lm_eval's table."""
    rows = []
    for task, metrics in results["results"].items():
        shots = str(results.get("n-shot", {}).get(task, ""))
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue  # "alias", "sample_len": not metrics
            metric, _, filter_name = key.partition(",")
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            rows.append(
                (
                    metrics.get("alias", task),
                    filter_name,
                    shots,
                    metric,
                    f"{value:.4f}",
                    f"{stderr:.4f}" if isinstance(stderr, float) and math.isfinite(stderr) else "",
                )
            )
    return rows


def results_path(ckpt_dir: Path, tag: str, tasks: list[str]) -> Path:
    """`eval/<tag>_<tasks>.json`; a long task list is shortened by a hash."""
    name = f"{tag}_{'+'.join(tasks)}"
    if len(name) > 100:
        name = f"{name[:80]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return eval_dir(ckpt_dir) / f"{name}.json"


def benchmark_command(
    checkpoint_path: str,
    tasks: str,
    limit: float | None,
    num_fewshot: int | None,
    include_path: str | None,
    batch_size: int,
    dtype: str,
    device: str | None,
    as_json: bool,
) -> int:
    if limit is not None and limit <= 0:
        raise ValueError(f"--limit must be > 0 (documents, or a fraction below 1), got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    ckpt_dir, tag = checkpoint.resolve(checkpoint_path)
    manager = task_manager(include_path)
    names = parse_tasks(tasks, manager)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # our table is the report

    with Tracker() as progress, progress.phase(f"loading {ckpt_dir / tag}"):
        model, tokenizer = load_model(ckpt_dir / tag, dtype=dtype)
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results = run_benchmarks(
        model,
        tokenizer,
        names,
        manager,
        limit=limit,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
    )
    saved = {k: results[k] for k in SAVED_KEYS if k in results}
    saved["checkpoint"] = str(ckpt_dir / tag)
    saved["limit"] = limit
    path = results_path(ckpt_dir, tag, names)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(saved, indent=2, default=str) + "\n")

    from lm_eval.utils import make_table

    path.with_suffix(".md").write_text(make_table(results) + "\n")
    if as_json:
        print(json.dumps(saved, default=str))
        return 0
    table = Table(title=f"{ckpt_dir / tag}" + (f" (limit {limit:g})" if limit else ""))
    for column in ("task", "filter", "n-shot", "metric", "value", "± stderr"):
        table.add_column(column, justify="right" if column in ("value", "± stderr") else "left")
    for row in result_rows(results):
        table.add_row(*row)
    console = Console()
    console.print(table)
    console.print(f"saved {path} and {path.with_suffix('.md').name}")
    return 0
