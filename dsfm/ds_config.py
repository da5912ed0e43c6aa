"""Reading a DeepSpeed JSON recipe without importing deepspeed (for `dsfm plan`).

engine.py fills and runs these recipes; the reading and the two facts everyone asks
(precision, ZeRO stage) live here so tools that only plan stay import-light.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dsfm.config import ConfigError


def read_ds_config(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"DeepSpeed config {p} not found (see ds_configs/*.json)"])
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
