"""The cross-field rules of a training config, checked at once and before anything is built.

`check` is pure: it reads nothing but the config and the world size, changes nothing, and
returns every problem as one line that names the fields and the fix. Whether the datasets,
checkpoints and packages a config names exist is the resolve step's question (`resolve.py`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from dsfm.config.schema import (
    LOG_SINKS,
    PRECISIONS,
    SCHEDULE_KINDS,
    WANDB_MODES,
    Config,
    suggest,
)

AT_LEAST_ONE = [
    ("train", "max_steps"),
    ("train", "micro_batch_size"),
    ("train", "grad_accum"),
    ("train", "seq_len"),
    ("eval", "batches"),
    ("checkpoint", "keep_last"),
    ("train", "max_bad_steps"),
]
NOT_NEGATIVE = [
    ("eval", "every"),
    ("checkpoint", "every"),
    ("schedule", "warmup_steps"),
    ("optim", "weight_decay"),
    ("optim", "grad_clip"),
    ("train", "log_every"),
    ("train", "spike_sigma"),
    ("train", "watchdog_s"),
    ("eval", "patience"),
    ("eval", "min_delta"),
]


def check(cfg: Config, world_size: int = 1) -> list[str]:
    """Every rule the config breaks, [] when none."""
    bad = [(key, value) for key, value in _numbers(cfg, "") if not math.isfinite(value)]
    # A NaN slips through every comparison below: say it once, by its key, and not again.
    keys = tuple(f"{key.split('[')[0]} " for key, _ in bad)
    return [f"{key}={value} is not a finite number; give it a real value" for key, value in bad] + [
        q for q in _rules(cfg, world_size) if not q.replace("=", " ", 1).startswith(keys)
    ]


def _numbers(value: Any, key: str) -> list[tuple[str, float]]:
    if dataclasses.is_dataclass(value):
        fields = [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
        return [n for name, v in fields for n in _numbers(v, f"{key}.{name}".lstrip("."))]
    if isinstance(value, (list, tuple)):
        return [n for i, v in enumerate(value) for n in _numbers(v, f"{key}[{i}]")]
    if isinstance(value, float):
        return [(key, value)]
    return []


def _rules(cfg: Config, world_size: int) -> list[str]:
    p: list[str] = []
    t, o, s = cfg.train, cfg.optim, cfg.schedule
    for sec, name in AT_LEAST_ONE:
        value = getattr(getattr(cfg, sec), name)
        if value is None or value < 1:
            p.append(f"{sec}.{name} must be >= 1, got {value}")
    for sec, name in NOT_NEGATIVE:
        value = getattr(getattr(cfg, sec), name)
        if value < 0:
            p.append(f"{sec}.{name} must be >= 0, got {value}")
    p += cfg.model.problems()
    if t.seq_len and cfg.model.max_seq_len and t.seq_len > cfg.model.max_seq_len:
        p.append(
            f"train.seq_len={t.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len} "
            "(lower train.seq_len or raise model.max_seq_len)"
        )
    if o.lr <= 0:
        p.append(f"optim.lr must be > 0, got {o.lr}")
    if not all(0.0 <= b < 1.0 for b in o.betas):
        p.append(f"optim.betas must each be in [0, 1), got {list(o.betas)}")
    if not 0.0 <= s.min_lr_ratio <= 1.0:
        p.append(f"schedule.min_lr_ratio must be in [0, 1], got {s.min_lr_ratio}")
    if s.kind not in SCHEDULE_KINDS:
        p.append(f"schedule.kind: unknown kind {s.kind!r}{suggest(s.kind, list(SCHEDULE_KINDS))}")
    if not 0.0 < s.decay_fraction <= 1.0:
        p.append(f"schedule.decay_fraction must be in (0, 1], got {s.decay_fraction}")
    if t.epochs is not None and t.epochs < 1:
        p.append(f"train.epochs must be >= 1, got {t.epochs}")
    if t.epochs is None:  # with epochs, max_steps is known after the resolve step
        p += steps_problems(cfg)
    if t.init_from and t.resume_from:
        p.append(
            f"train.init_from={t.init_from} and train.resume_from={t.resume_from} are both "
            "set; init_from starts a new run from weights only, resume_from continues a run "
            "(weights, optimizer, schedule, data position): pick one"
        )
    if not 0.0 < t.rollback_lr_scale <= 1.0:
        p.append(f"train.rollback_lr_scale must be in (0, 1], got {t.rollback_lr_scale}")
    if cfg.eval.patience and not cfg.eval.every:
        p.append(
            f"eval.patience={cfg.eval.patience} needs periodic evals; set eval.every > 0 "
            "(or eval.patience=0 to turn early stopping off)"
        )
    p += _log_problems(cfg)
    p += cfg.lora.problems()
    if t.precision is not None and t.precision not in PRECISIONS:
        p.append(
            f"train.precision must be one of {', '.join(PRECISIONS)} (or null), got {t.precision!r}"
        )
    if t.global_batch_size is not None:
        actual = t.micro_batch_size * t.grad_accum * world_size
        if actual != t.global_batch_size:
            p.append(
                f"train.global_batch_size={t.global_batch_size} but micro_batch_size "
                f"({t.micro_batch_size}) x grad_accum ({t.grad_accum}) x world size "
                f"({world_size}) = {actual}; adjust grad_accum or micro_batch_size"
            )
    p += _data_problems(cfg)
    return p


def steps_problems(cfg: Config) -> list[str]:
    """The rules that need train.max_steps (resolved from train.epochs, if that is set)."""
    t, s = cfg.train, cfg.schedule
    p = []
    if t.max_steps and s.warmup_steps >= t.max_steps:
        p.append(
            f"schedule.warmup_steps={s.warmup_steps} must be below train.max_steps="
            f"{t.max_steps} (there would be no decay phase)"
        )
    elif s.kind == "wsd" and s.decay_steps(t.max_steps) > t.max_steps - s.warmup_steps:
        p.append(
            f"schedule.decay_fraction={s.decay_fraction} decays over the last "
            f"{s.decay_steps(t.max_steps)} of {t.max_steps} updates, overlapping the "
            f"{s.warmup_steps} warmup updates; lower decay_fraction or warmup_steps"
        )
    if t.stop_at is not None and not 0 < t.stop_at <= t.max_steps:
        p.append(f"train.stop_at={t.stop_at} must be in [1, train.max_steps={t.max_steps}]")
    return p


def _log_problems(cfg: Config) -> list[str]:
    p = []
    for name in cfg.log.sinks:
        if name not in LOG_SINKS:
            hint = suggest(name, list(LOG_SINKS), known=False)
            p.append(f"log.sinks: unknown sink {name!r}{hint}; known sinks: {', '.join(LOG_SINKS)}")
    if cfg.log.wandb_mode is not None and cfg.log.wandb_mode not in WANDB_MODES:
        p.append(
            f"log.wandb_mode must be one of {', '.join(WANDB_MODES)}, got {cfg.log.wandb_mode!r}"
        )
    return p


def _data_problems(cfg: Config) -> list[str]:
    """The shape of the data section; what the directories hold is `resolve.py`'s to read."""
    d = cfg.data
    if d.path and d.mix:
        return [
            "data.path and data.mix are both set; use data.path for one dataset, data.mix "
            "for a blend"
        ]
    p = []
    names = [name for name, _, _ in d.sources()]
    for name in sorted({n for n in names if names.count(n) > 1}):
        p.append(f"data.mix: two sources are named {name!r}; give each a distinct `name:`")
    for name, path, weight in d.sources():
        if d.mix and not weight > 0:
            p.append(f"data.mix source {name!r} ({path or '?'}): weight must be > 0, got {weight}")
    return p
