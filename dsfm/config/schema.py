"""The training config's schema: one dataclass per section, every field with a one-line doc.

Each component receives only its own section (`cfg.optim` for the optimizer, ...), never
the whole config. The model's own sections (`model:`, `lora:`) are the model's dataclasses
(`dsfm/model/config.py`). The string literal after each field is its documentation:
`dsfm config` prints the reference generated from them (`reference.py`). No torch here.
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from dsfm.model.config import LoraConfig, ModelConfig


class ConfigError(ValueError):
    """Every problem found in a configuration, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid configuration ({len(problems)} problem(s)):\n{lines}")


def suggest(name: str, options: list[str], *, known: bool = True) -> str:
    """ " (did you mean 'x'?)" for a near miss, else the known names (or "" without `known`)."""
    close = difflib.get_close_matches(name, options, n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (known: {', '.join(options)})" if known else ""


@dataclass
class MixSource:
    path: str = ""
    "Prepared dataset directory of this source."
    weight: float = 1.0
    "Relative share of training samples (weights need not sum to 1)."
    name: str | None = None
    "Name in metrics (`epochs`, `val_loss/<name>`); default: the directory's name."


@dataclass
class DataConfig:
    path: str = ""
    "Prepared dataset directory (output of `dsfm prepare`); one-source shorthand for mix."
    mix: list[MixSource] = field(default_factory=list)
    "Weighted blend of prepared datasets: [{path: A, weight: 0.7}, {path: B, weight: 0.3}]."

    def sources(self) -> list[tuple[str, str, float]]:
        """(name, path, weight) of every source: `mix`, or `path` as one source."""
        if not self.mix:
            return [(Path(self.path).name, self.path, 1.0)] if self.path else []
        return [(m.name or Path(m.path).name, m.path, m.weight) for m in self.mix]


@dataclass
class OptimConfig:
    lr: float = 3e-4
    "Peak learning rate."
    betas: tuple[float, float] = (0.9, 0.95)
    "AdamW betas."
    eps: float = 1e-8
    "AdamW epsilon."
    weight_decay: float = 0.1
    "Decoupled weight decay, applied only to >=2-D weights (not norms, not biases)."
    grad_clip: float = 1.0
    "Clip the global gradient norm to this value (0 disables)."


@dataclass
class ScheduleConfig:
    kind: str = "cosine"
    "The LR after warmup: cosine or linear decay to the floor, constant (the peak), or wsd."
    warmup_steps: int = 100
    "Linear warmup updates: update k (0-based) uses lr*(k+1)/warmup_steps; the last one the peak."
    min_lr_ratio: float = 0.1
    "The LR floor, lr * min_lr_ratio, reached exactly at the last update (not used by constant)."
    decay_fraction: float = 0.2
    "wsd: the last fraction of train.max_steps that decays linearly to the floor (stable before)."

    def decay_steps(self, max_steps: int) -> int:
        """wsd: the updates after the last one at the peak (the last reaching the floor)."""
        return max(1, round(self.decay_fraction * max_steps))


@dataclass
class TrainConfig:
    max_steps: int = 1000
    "Optimizer steps to train for (or set train.epochs instead, not both)."
    epochs: int | None = None
    "Train for this many passes over the training data: max_steps is resolved from its size."
    micro_batch_size: int = 8
    "Sequences per rank per forward pass."
    grad_accum: int = 1
    "Micro-batches accumulated per optimizer step."
    global_batch_size: int | None = None
    "Optional check: must equal micro_batch_size * grad_accum * world size."
    seq_len: int = 512
    "Tokens per training sequence (inputs; each sample reads seq_len + 1 tokens)."
    seed: int = 1337
    "Seed for init, data order, dropout and sampling."
    out_dir: str = "runs/default"
    "Run directory: metrics, samples, resolved configs, checkpoints."
    precision: str | None = None
    "bf16, fp16 or fp32; None keeps what the DeepSpeed config says."
    log_every: int = 10
    "Print a status line every N steps (metrics.jsonl gets every step)."
    init_from: str | None = None
    "Start from these weights (run, tag or plain checkpoint); its model section replaces ours."
    resume_from: str | None = None
    "Resume the whole state of a tag: best, final, step_N, epoch_N (in out_dir) or a PATH."
    stop_at: int | None = None
    "Stop this invocation after this step with a checkpoint; the schedule still spans max_steps."
    compile: bool = False
    "torch.compile the model inside the DeepSpeed engine (engine.compile()); GPU speed-up."
    max_bad_steps: int = 5
    "Consecutive skipped (non-finite) steps before rolling back to the last good checkpoint."
    rollback_lr_scale: float = 1.0
    "Multiply the LR by this at each rollback (e.g. 0.5); 1 keeps the schedule as it was."
    spike_sigma: float = 0.0
    "Loss above the running mean by this many std devs is a spike event (0 disables)."
    spike_skip: bool = False
    "Skip the update of a spike step (it is always logged as an event in metrics.jsonl)."
    watchdog_s: float = 1800.0
    "Exit non-zero when a rank makes no progress for this long (0 = off); collectives: 2x."


@dataclass
class EvalConfig:
    every: int = 200
    "Run validation and sampling every N steps (0 disables; also runs at the end)."
    batches: int = 20
    "Validation batches per eval (the same batches every time)."
    prompts: list[str] = field(default_factory=lambda: ["def ", "The "])
    "Prompts for sample generations written to samples.jsonl."
    max_new_tokens: int = 64
    "Tokens generated per prompt."
    temperature: float = 0.8
    "Sampling temperature for eval generations (0 = greedy)."
    top_k: int | None = 50
    "Top-k for eval generations (None disables)."
    patience: int = 0
    "Early stopping: stop after this many evals in a row without a new best val loss (0 = off)."
    min_delta: float = 0.0
    "Early stopping: a val loss must beat the best by at least this much to count as better."


@dataclass
class CheckpointConfig:
    every: int = 500
    "Save a checkpoint every N steps (0 = only the final one)."
    keep_last: int = 3
    "Keep this many step checkpoints; `best`, `final` and epoch tags are kept besides."
    every_epoch: bool = False
    "Also save a tag `epoch_N` each time the sampler completes pass N over the training data."
    save_best: bool = True
    "Keep a `best` tag for the lowest validation loss."
    allow_data_change: bool = False
    "Resume even though the dataset or tokenizer differ from the checkpoint's (on purpose)."


@dataclass
class LogConfig:
    sinks: list[str] = field(default_factory=lambda: ["console"])
    "Metric sinks besides metrics.jsonl (always written): console, csv, tensorboard, wandb."
    wandb_project: str | None = None
    "W&B project; None = $WANDB_PROJECT, else 'dsfm'. The run is named after its directory."
    wandb_mode: str | None = None
    "W&B mode: online, offline (sync later) or disabled; None = $WANDB_MODE, else offline."
    wandb_entity: str | None = None
    "W&B entity (user or team); None = $WANDB_ENTITY, else your default entity."
    wandb_group: str | None = None
    "W&B group of related runs (a sweep); None = $WANDB_RUN_GROUP, else none."
    wandb_tags: list[str] | None = None
    "W&B tags of the run; None = $WANDB_TAGS (comma-separated), else none."
    warnings: bool = True
    "Watch the run: warn on a stalled loss, overfitting, exploding grad norm, throughput drop."


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    log: LogConfig = field(default_factory=LogConfig)


SECTIONS: dict[str, type] = typing.get_type_hints(Config)
PRECISIONS = ("bf16", "fp16", "fp32")
SCHEDULE_KINDS = ("cosine", "linear", "constant", "wsd")
# Sink name -> the package it needs (the sinks themselves are in dsfm/observe/sinks.py).
LOG_SINKS = {"console": None, "csv": None, "tensorboard": "tensorboard", "wandb": "wandb"}
WANDB_MODES = ("online", "offline", "disabled")
