"""The DeepSpeed JSON (`--ds`): reading it, the facts everyone asks of it, filling its "auto"s.

DeepSpeed JSONs under ds_configs/ say *how* to run (ZeRO stage, offload, precision); the
batch sizes, optimizer hyper-parameters and clipping are "auto" there and filled here from
the training config, so there is one source of truth. A concrete value in the JSON that
disagrees with the training config is refused rather than silently winning. The LR
schedule is not DeepSpeed's: the trainer sets each update's LR (`dsfm/train/schedule.py`),
and a JSON with a "scheduler" section is refused. No deepspeed and no torch here: `dsfm plan`
and `dsfm runs` read recipes too; `dsfm.train.engine` runs them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from dsfm.config.load import bundled
from dsfm.config.schema import Config, ConfigError


def read_ds_config(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            [
                f"DeepSpeed config {p} not found: pass the path to your JSON or a bundled "
                f"recipe ({', '.join(bundled('ds_configs'))}; `dsfm config --list`)"
            ]
        )
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError([f"DeepSpeed config {p} is not valid JSON: {e}"]) from None


def precision(ds: dict[str, Any]) -> str:
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds: dict[str, Any]) -> bool:
    """Optimizer states in CPU memory (or NVMe): DeepSpeed's CPU Adam does the update."""
    device = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none")


def fill_ds_config(ds: dict[str, Any], cfg: Config, world_size: int) -> dict[str, Any]:
    """Resolve every "auto" from the training config; refuse values that disagree with it."""
    ds = copy.deepcopy(ds)
    t, o = cfg.train, cfg.optim
    problems: list[str] = []

    def fill(section: dict[str, Any], key: str, value: Any, where: str) -> None:
        current = section.get(key, "auto")
        if current == "auto":
            section[key] = value
        elif current != value and not (isinstance(value, list) and list(current) == value):
            problems.append(
                f"DeepSpeed config sets {where}={current!r} but the training config "
                f'implies {value!r}; set it to "auto" and change the training config'
            )

    fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, "train_micro_batch_size_per_gpu")
    fill(ds, "gradient_accumulation_steps", t.grad_accum, "gradient_accumulation_steps")
    fill(ds, "train_batch_size", t.micro_batch_size * t.grad_accum * world_size, "train_batch_size")
    fill(ds, "gradient_clipping", o.grad_clip, "gradient_clipping")

    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if opt.get("type", "").lower() not in ("adamw", "adam"):
        problems.append(f"optimizer.type {opt.get('type')!r} is not supported; use AdamW")
    params = opt.setdefault("params", {})
    for key, value in [
        ("lr", o.lr),
        ("betas", list(o.betas)),
        ("eps", o.eps),
        ("weight_decay", o.weight_decay),
    ]:
        fill(params, key, value, f"optimizer.params.{key}")
    params.setdefault("adam_w_mode", True)
    if not offloads_optimizer(ds) and params.setdefault("torch_adam", True):
        # torch's AdamW, fused (one kernel per step, on CUDA and CPU alike), built by DeepSpeed
        # from these params. Its own FusedAdam would JIT-compile a CUDA op with nvcc on first
        # use: a pip-installed torch has no nvcc. Optimizer offload keeps DeepSpeedCPUAdam
        # (C++ only), which DeepSpeed picks when torch_adam is unset.
        params.setdefault("fused", True)

    if "scheduler" in ds:
        # DeepSpeed's schedulers count their own steps with offsets of their own; dsfm sets
        # the LR of every update itself (dsfm/train/schedule.py), so there is one schedule.
        problems.append(
            'DeepSpeed config has a "scheduler" section; dsfm sets the LR itself from the '
            "training config's schedule section (schedule.kind, warmup_steps, min_lr_ratio): "
            'remove "scheduler" from the JSON'
        )
    if t.precision is not None:
        ds["bf16"] = {"enabled": t.precision == "bf16"}
        fp16 = ds.get("fp16", {}) if t.precision == "fp16" else {}
        ds["fp16"] = {**fp16, "enabled": t.precision == "fp16"}
        if t.precision == "fp16":
            ds["fp16"].setdefault("loss_scale", 0)  # dynamic loss scaling
            ds["fp16"].setdefault("initial_scale_power", 16)
    if ds.get("bf16", {}).get("enabled") and ds.get("bf16", {}).get("check_grad_overflow") is False:
        problems.append(
            "DeepSpeed config sets bf16.check_grad_overflow=false; dsfm relies on it to skip "
            "updates with a non-finite gradient norm (remove the key)"
        )
    if ds.get("bf16", {}).get("enabled") and ds.get("fp16", {}).get("enabled"):
        problems.append("DeepSpeed config enables both bf16 and fp16; pick one (train.precision)")
    leftover = _find_auto(ds)
    if leftover:
        problems.append(f'DeepSpeed config keys still "auto" that dsfm cannot fill: {leftover}')
    if problems:
        raise ConfigError(problems)
    return ds


def _find_auto(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _find_auto(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if node == "auto" else []
