"""Training configuration: YAML -> nested typed dataclasses -> one validation pass.

Precedence is defaults < YAML file < `key.sub=value` overrides. Every field carries a
one-line docstring (the string literal after it) that `dsfm config-docs` prints.
Unknown keys, wrong types and impossible combinations are all collected and raised
together as one `ConfigError` before any engine is built. Each component receives
only its own section (`cfg.optim` for the optimizer, ...), never the whole config.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import hashlib
import importlib.util
import inspect
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dsfm.model.presets import PRESETS


class ConfigError(ValueError):
    """Every problem found in a configuration, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid configuration ({len(problems)} problem(s)):\n{lines}")


@dataclass
class ModelConfig:
    preset: str | None = None
    "Size preset (d2..d32 by depth, 135m, 1.4b); explicit fields below override it."
    vocab_size: int = 0
    "Vocabulary size; 0 takes the prepared dataset's vocabulary size."
    n_layers: int = 4
    "Number of transformer blocks."
    d_model: int = 256
    "Model width (embedding and residual stream size)."
    n_heads: int = 4
    "Attention (query) heads; must divide d_model."
    n_kv_heads: int | None = None
    "Key/value heads for grouped-query attention; must divide n_heads. None = n_heads."
    ffn_hidden: int | None = None
    "SwiGLU hidden size. None = 8/3 * d_model rounded up to a multiple of 64."
    max_seq_len: int = 2048
    "Longest sequence the model accepts (RoPE table size)."
    rope_theta: float = 10000.0
    "RoPE base frequency."
    norm_eps: float = 1e-5
    "RMSNorm epsilon."
    tie_embeddings: bool = False
    "Share the token embedding with the LM head."
    dropout: float = 0.0
    "Dropout on attention probabilities and residual branches (0 for pretraining)."
    init_std: float = 0.02
    "Std of the normal init; output projections are scaled by 1/sqrt(2 * n_layers)."
    kernels: str = "auto"
    "Fused ops: triton, torch, or auto (Triton on CUDA when installed, else PyTorch)."
    activation_checkpointing: bool = False
    "Recompute each block's activations in backward: less memory, about 1/3 more compute."

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


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
    warmup_steps: int = 100
    "Linear warmup steps (DeepSpeed WarmupCosineLR)."
    min_lr_ratio: float = 0.1
    "Cosine decays the LR to lr * min_lr_ratio at train.max_steps."


@dataclass
class TrainConfig:
    max_steps: int = 1000
    "Optimizer steps to train for."
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
    "Keep this many step checkpoints; `best` and `final` are kept besides."
    save_best: bool = True
    "Keep a `best` tag for the lowest validation loss."
    allow_data_change: bool = False
    "Resume even though the dataset or tokenizer differ from the checkpoint's (on purpose)."


@dataclass
class LogConfig:
    sinks: list[str] = field(default_factory=lambda: ["console"])
    "Metric sinks besides metrics.jsonl (always written): console, csv, tensorboard, wandb."
    wandb_project: str | None = None
    "W&B project for the wandb sink; None = the run directory's name."
    wandb_mode: str = "offline"
    "W&B mode: offline (no network; `wandb sync RUN/wandb/offline-run-*` later) or online."
    warnings: bool = True
    "Watch the run: warn on a stalled loss, overfitting, exploding grad norm, throughput drop."


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraConfig:
    rank: int = 0
    "LoRA rank; 0 trains every weight (full fine-tuning or pretraining)."
    alpha: float = 16.0
    "LoRA scale numerator: the update is (alpha / rank) * B @ A."
    dropout: float = 0.0
    "Dropout on the LoRA branch's input."
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    "Projections that get adapters (attention q/k/v/o and MLP gate/up/down)."


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
KERNELS = ("auto", "triton", "torch")  # as dsfm.model.ops.KERNELS; config stays torch-free
# Sink name -> the package it needs (the sinks themselves are in dsfm/sinks.py).
LOG_SINKS = {"console": None, "csv": None, "tensorboard": "tensorboard", "wandb": "wandb"}
WANDB_MODES = ("offline", "online")


# ---------------------------------------------------------------- loading


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    world_size: int = 1,
    check_data: bool = True,
) -> Config:
    """Defaults < YAML file < `key.sub=value` overrides, then every check in `validate`.

    Raises one ConfigError listing every problem: syntax, unknown keys, wrong types and
    impossible combinations together.
    """
    raw: dict[str, Any] = {}
    problems: list[str] = []
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides or []:
        try:
            _apply_override(raw, item)
        except ValueError as e:
            problems.append(str(e))
    cfg = _build(raw, problems)
    problems += check(cfg, world_size, check_data=check_data)
    if problems:
        raise ConfigError(problems)
    return cfg


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(
            [
                f"config file {path} not found (pass --config configs/smoke.yaml or a "
                "path to your own YAML)"
            ]
        )
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"{path} is not valid YAML: {e}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError(
            [
                f"{path} must hold a mapping of sections (model:, train:, ...), "
                f"got {type(raw).__name__}"
            ]
        )
    return raw


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ValueError(f"override {item!r} is not of the form key.sub=value")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"override key {key!r} must be section.field, e.g. train.max_steps=100")
    section = raw.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise ValueError(f"override {item!r}: section {parts[0]!r} is not a mapping")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text  # a plain string with YAML-special characters
    section[parts[1]] = value


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(options)})"


def _build(raw: dict[str, Any], problems: list[str]) -> Config:
    sections: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in SECTIONS:
            problems.append(f"unknown section {name!r}{_suggest(name, list(SECTIONS))}")
            continue
        if not isinstance(value, dict):
            problems.append(f"section {name!r} must be a mapping, got {value!r}")
            continue
        cls = SECTIONS[name]
        if name == "model":
            value = _with_preset(value, problems)
        sections[name] = _build_section(name, cls, value, problems)
    cfg = Config(**sections)
    _resolve_model(cfg.model)
    return cfg


def _with_preset(value: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    preset = value.get("preset")
    if preset is None:
        return value
    if preset not in PRESETS:
        problems.append(
            f"model.preset: unknown preset {preset!r}{_suggest(str(preset), list(PRESETS))}"
        )
        return value
    return {**PRESETS[preset], **value}  # explicit fields beat the preset


def _build_section(section: str, cls: type, value: dict[str, Any], problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, item in value.items():
        if key not in hints:
            problems.append(f"unknown key {section}.{key}{_suggest(key, list(hints))}")
            continue
        try:
            kwargs[key] = _coerce(item, hints[key])
        except TypeError as e:
            problems.append(f"{section}.{key}: {e}")
    return cls(**kwargs)


def _coerce(value: Any, tp: Any) -> Any:
    """A YAML/CLI value converted to the annotated type, or TypeError saying what was expected."""
    if dataclasses.is_dataclass(tp):  # a list item such as data.mix's {path:, weight:}
        hints = typing.get_type_hints(tp)
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"expected a mapping with keys {', '.join(hints)}, got {value!r}")
        for key in value:
            if key not in hints:
                raise TypeError(f"unknown key {key!r}{_suggest(str(key), list(hints))}")
        return tp(**{k: _coerce(v, hints[k]) for k, v in value.items()})
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0])
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected a list, got {value!r}")
        if origin is tuple:
            if len(value) != len(args):
                raise TypeError(f"expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a) for v, a in zip(value, args))
        return [_coerce(v, args[0]) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return (
                    int(float(value)) if float(value).is_integer() else _fail(value, "an integer")
                )
            except ValueError:
                pass
        _fail(value, "an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 3e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        _fail(value, "a number")
    if tp is str:
        if isinstance(value, str):
            return value
        _fail(value, "a string")
    raise TypeError(f"unsupported type {tp}")


def _fail(value: Any, expected: str) -> Any:
    raise TypeError(f"expected {expected}, got {value!r}")


def _resolve_model(m: ModelConfig) -> None:
    if m.n_kv_heads is None:
        m.n_kv_heads = m.n_heads
    if m.ffn_hidden is None:
        from dsfm.model.presets import _swiglu_hidden

        m.ffn_hidden = _swiglu_hidden(m.d_model)


# ---------------------------------------------------------------- validation


def validate(cfg: Config, world_size: int = 1, *, check_data: bool = True) -> None:
    """Raise one ConfigError listing every problem `check` finds."""
    problems = check(cfg, world_size, check_data=check_data)
    if problems:
        raise ConfigError(problems)


def check(cfg: Config, world_size: int = 1, *, check_data: bool = True) -> list[str]:
    """Every cross-field rule at once; fills model.vocab_size from the data when it is 0.

    Runs before any engine or model is built.
    """
    p: list[str] = []
    m, t, o, s = cfg.model, cfg.train, cfg.optim, cfg.schedule

    for sec, name in [
        ("model", "n_layers"),
        ("model", "d_model"),
        ("model", "n_heads"),
        ("model", "n_kv_heads"),
        ("model", "ffn_hidden"),
        ("model", "max_seq_len"),
        ("train", "max_steps"),
        ("train", "micro_batch_size"),
        ("train", "grad_accum"),
        ("train", "seq_len"),
        ("eval", "batches"),
        ("checkpoint", "keep_last"),
        ("train", "max_bad_steps"),
    ]:
        value = getattr(getattr(cfg, sec), name)
        if value is None or value < 1:
            p.append(f"{sec}.{name} must be >= 1, got {value}")
    for sec, name in [
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
    ]:
        if getattr(getattr(cfg, sec), name) < 0:
            p.append(f"{sec}.{name} must be >= 0, got {getattr(getattr(cfg, sec), name)}")

    if m.n_heads and m.d_model % m.n_heads:
        p.append(
            f"model.n_heads={m.n_heads} does not divide model.d_model={m.d_model} "
            f"(pick n_heads so that d_model / n_heads is a whole head size, e.g. "
            f"{max(1, m.d_model // 64)})"
        )
    elif m.n_heads and (m.d_model // m.n_heads) % 2:
        p.append(
            f"head size d_model/n_heads = {m.d_model // m.n_heads} is odd; RoPE needs an even "
            "head size"
        )
    if m.n_kv_heads and m.n_heads and m.n_heads % m.n_kv_heads:
        p.append(
            f"model.n_kv_heads={m.n_kv_heads} does not divide model.n_heads={m.n_heads} "
            "(each key/value head serves a whole group of query heads)"
        )
    if m.kernels not in KERNELS:
        p.append(f"model.kernels must be one of {', '.join(KERNELS)}, got {m.kernels!r}")
    elif m.kernels == "triton" and importlib.util.find_spec("triton") is None:
        p.append(
            "model.kernels=triton but triton is not installed; `pip install triton` "
            "or use model.kernels=auto (PyTorch fallback where Triton cannot run)"
        )
    if not 0.0 <= m.dropout < 1.0:
        p.append(f"model.dropout must be in [0, 1), got {m.dropout}")
    if t.seq_len and m.max_seq_len and t.seq_len > m.max_seq_len:
        p.append(
            f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len} "
            "(lower train.seq_len or raise model.max_seq_len)"
        )
    if o.lr <= 0:
        p.append(f"optim.lr must be > 0, got {o.lr}")
    if not all(0.0 <= b < 1.0 for b in o.betas):
        p.append(f"optim.betas must each be in [0, 1), got {list(o.betas)}")
    if not 0.0 <= s.min_lr_ratio <= 1.0:
        p.append(f"schedule.min_lr_ratio must be in [0, 1], got {s.min_lr_ratio}")
    if t.max_steps and s.warmup_steps >= t.max_steps:
        p.append(
            f"schedule.warmup_steps={s.warmup_steps} must be below train.max_steps="
            f"{t.max_steps} (there would be no cosine phase)"
        )
    if not 0.0 < t.rollback_lr_scale <= 1.0:
        p.append(f"train.rollback_lr_scale must be in (0, 1], got {t.rollback_lr_scale}")
    if cfg.eval.patience and not cfg.eval.every:
        p.append(
            f"eval.patience={cfg.eval.patience} needs periodic evals; set eval.every > 0 "
            "(or eval.patience=0 to turn early stopping off)"
        )
    _check_log(cfg.log, p, check_packages=check_data)
    lo = cfg.lora
    if lo.rank < 0 or lo.alpha <= 0 or not 0.0 <= lo.dropout < 1.0:
        p.append(
            f"lora: rank must be >= 0, alpha > 0 and dropout in [0, 1); got rank={lo.rank}, "
            f"alpha={lo.alpha}, dropout={lo.dropout}"
        )
    bad_targets = sorted(set(lo.targets) - set(LORA_TARGETS))
    if bad_targets:
        p.append(f"lora.targets: unknown {bad_targets} (choose from {LORA_TARGETS})")
    if t.stop_at is not None and not 0 < t.stop_at <= t.max_steps:
        p.append(f"train.stop_at={t.stop_at} must be in [1, train.max_steps={t.max_steps}]")
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
    if check_data:
        _check_data(cfg, p)
    return p


def _check_log(lg: LogConfig, p: list[str], check_packages: bool) -> None:
    """Sink names and modes; the packages only when about to train (with the data check), so
    a checkpoint whose run logged to W&B still loads where wandb is not installed."""
    known = ", ".join(LOG_SINKS)
    for name in lg.sinks:
        if name not in LOG_SINKS:
            close = difflib.get_close_matches(name, list(LOG_SINKS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            p.append(f"log.sinks: unknown sink {name!r}{hint}; known sinks: {known}")
            continue
        package = LOG_SINKS[name]
        if check_packages and package and importlib.util.find_spec(package) is None:
            p.append(
                f"log.sinks: {name} needs the {package} package; `pip install {package}` "
                f"or drop {name!r} from log.sinks"
            )
    if lg.wandb_mode not in WANDB_MODES:
        p.append(f"log.wandb_mode must be one of {', '.join(WANDB_MODES)}, got {lg.wandb_mode!r}")


# What a blend's sources must share: same token ids meaning the same thing, same loss kind.
SHARED_META = ("vocab_size", "eot_id", "loss_mask", "chat_template")


def _check_data(cfg: Config, p: list[str]) -> None:
    d = cfg.data
    if d.path and d.mix:
        p.append(
            "data.path and data.mix are both set; use data.path for one dataset, data.mix "
            "for a blend"
        )
        return
    if not d.path and not d.mix:
        p.append(
            "data.path is not set (prepare a dataset with `dsfm prepare` and pass data.path=DIR, "
            "or blend several with data.mix)"
        )
        return
    where = "data.path" if d.path else "data.mix"
    sources = d.sources()
    names = [name for name, _, _ in sources]
    for name in sorted({n for n in names if names.count(n) > 1}):
        p.append(f"data.mix: two sources are named {name!r}; give each a distinct `name:`")
    facts: dict[str, tuple] = {}
    for name, path, weight in sources:
        label = f"{where}={path}" if d.path else f"data.mix source {name!r} ({path or '?'})"
        if not weight > 0:
            p.append(f"{label}: weight must be > 0, got {weight}")
        info = _dataset_facts(path, label, p, blend=bool(d.mix))
        if info is not None:
            facts[name] = info
    if not facts:
        return
    (first, ref), *rest = facts.items()
    for name, info in rest:
        diff = [f"{k} {a!r} vs {b!r}" for k, a, b in zip(SHARED_META, ref, info) if a != b]
        if info[-1] != ref[-1]:
            diff.append("tokenizer.json differs")
        if diff:
            p.append(
                f"data.mix sources {first!r} and {name!r} were prepared with different tokenizers "
                f"or data kinds ({'; '.join(diff[:3])}); prepare both with the same tokenizer "
                "(dsfm prepare --tokenizer FILE)"
            )
    data_vocab = max(info[0] for info in facts.values())
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = data_vocab
    elif cfg.model.vocab_size < data_vocab:
        p.append(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the dataset's "
            f"vocabulary ({data_vocab}); token ids would overflow the embedding "
            "(set model.vocab_size=0 to take the data's)"
        )


def _dataset_facts(path: str, label: str, p: list[str], blend: bool) -> tuple | None:
    """SHARED_META values plus the tokenizer file's hash (blends only), or None after noting
    the problem."""
    meta_path = Path(path) / "meta.json"
    if not path or not meta_path.is_file():
        p.append(f"{label}: no meta.json there; is it a directory made by `dsfm prepare`?")
        return None
    try:
        meta = json.loads(meta_path.read_text())
        vocab = int(meta["vocab_size"])
    except (ValueError, KeyError, TypeError) as e:
        p.append(f"{meta_path} is unreadable or has no vocab_size ({e}); re-run `dsfm prepare`")
        return None
    digest = None
    if blend:
        tok_path = Path(path) / str(meta.get("tokenizer", "tokenizer.json"))
        if not tok_path.is_file():
            p.append(f"{label}: {tok_path.name} is missing; re-run `dsfm prepare`")
            return None
        digest = hashlib.sha256(tok_path.read_bytes()).hexdigest()
    return (
        vocab,
        meta.get("eot_id"),
        bool(meta.get("loss_mask")),
        meta.get("chat_template"),
        digest,
    )


# ---------------------------------------------------------------- writing and docs


def to_dict(cfg: Config) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["optim"]["betas"] = list(cfg.optim.betas)
    return d


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a resolved config (e.g. from a checkpoint's client state)."""
    problems: list[str] = []
    cfg = _build(d, problems)
    problems += check(cfg, check_data=False)
    if problems:
        raise ConfigError(problems)
    return cfg


def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstring written after each dataclass field."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = nxt.value.value  # type: ignore[union-attr]
    return docs


def reference() -> str:
    """Markdown reference of every setting, generated from the field docstrings."""
    lines = ["# Training config reference", ""]
    for name, cls in SECTIONS.items():
        lines += [f"## {name}", "", "| key | default | meaning |", "| --- | --- | --- |"]
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            )
            lines.append(
                f"| `{name}.{f.name}` | `{json.dumps(default)}` | {docs.get(f.name, '')} |"
            )
            item = typing.get_args(typing.get_type_hints(cls)[f.name])
            if item and dataclasses.is_dataclass(item[0]):  # list entries: data.mix[].path
                item_docs = field_docs(item[0])
                for sub in dataclasses.fields(item[0]):
                    lines.append(
                        f"| `{name}.{f.name}[].{sub.name}` | `{json.dumps(sub.default)}` | "
                        f"{item_docs.get(sub.name, '')} |"
                    )
        lines.append("")
    return "\n".join(lines)
