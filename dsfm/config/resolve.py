"""The resolve step: a checked config against the world it will train in.

`load_config` checks the config by itself; training also needs what the config names to
exist and agree. `resolve` reads each dataset's `meta.json` (`dsfm.data.format`), checks
that a blend's sources share one tokenizer and kind of data, fills `model.vocab_size` from
the data when it is 0 and `model.doc_mask` when it is None (on for chat data, whose
`meta.json` has a loss mask; off for pretraining), checks that the packages the chosen
sinks and kernels need are installed, and with `train.init_from` adopts the source
checkpoint's architecture (`dsfm.train.checkpoint` reads its client state). Like
`checks.check` it returns the problems rather than raising, with a new config; it changes
nothing it was given.
`load_resolved` loads and resolves a training config, and `resolve_configs` both configs of
a run (with the DeepSpeed JSON), each reporting every problem in one `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from typing import Any

from dsfm.config.checks import check, steps_problems
from dsfm.config.deepspeed import fill_ds_config, read_ds_config
from dsfm.config.load import from_dict, parse_config
from dsfm.config.schema import LOG_SINKS, Config, ConfigError
from dsfm.data.format import META_FILE, read_meta_file, shard_samples, tokenizer_digest
from dsfm.data.tokenizer import TOKENIZER_FILE, tokenizer_file
from dsfm.train import checkpoint

# What a blend's sources must share: same token ids meaning the same thing, same loss kind.
SHARED_META = ("vocab_size", "eot_id", "loss_mask", "chat_template")


def resolve_configs(
    config_path: str | None,
    ds_path: str,
    overrides: list[str],
    world_size: int,
) -> tuple[Config, dict[str, Any]]:
    """Both configs of a run, loaded and resolved, or one ConfigError listing every problem
    in either: the config's own, its data's and the DeepSpeed JSON's together."""
    problems: list[str] = []
    cfg = None
    try:
        cfg = load_resolved(config_path, overrides, world_size)
    except ConfigError as e:
        problems += e.problems
    try:
        ds = read_ds_config(ds_path)
        if cfg is not None:
            ds = fill_ds_config(ds, cfg, world_size)
    except ConfigError as e:
        problems += e.problems
    if problems:
        raise ConfigError(problems)
    return cfg, ds


def load_resolved(
    config_path: str | None, overrides: list[str] | None = None, world_size: int = 1
) -> Config:
    """`load_config` then `resolve`, with every problem of both in one ConfigError (a typo
    and a missing dataset are reported together)."""
    cfg, problems = parse_config(config_path, overrides)
    problems += check(cfg, world_size)
    # train.init_from is adopted only into a config without problems of its own
    cfg, more = resolve(cfg, world_size, adopt=not problems)
    if problems + more:
        raise ConfigError(problems + more)
    return cfg


def resolve(cfg: Config, world_size: int = 1, adopt: bool = True) -> tuple[Config, list[str]]:
    """`cfg` with the data's vocabulary and (with `adopt`) `train.init_from`'s model, and
    every problem found doing so; `cfg` itself is not changed."""
    p = _package_problems(cfg)
    data_vocab, chat = _data_facts(cfg, p)
    model = cfg.model
    if data_vocab and model.doc_mask is None:
        # Chat windows pack unrelated conversations; pretraining stays off until a GPU
        # benchmark shows document masking is not slower (benchmarks/throughput.py --doc-mask).
        model = dataclasses.replace(model, doc_mask=chat)
    if data_vocab and model.vocab_size == 0:
        model = dataclasses.replace(model, vocab_size=data_vocab)
    elif model.vocab_size < data_vocab:
        p.append(
            f"model.vocab_size={model.vocab_size} is smaller than the dataset's "
            f"vocabulary ({data_vocab}); token ids would overflow the embedding "
            "(set model.vocab_size=0 to take the data's)"
        )
    resolved = dataclasses.replace(cfg, model=model)
    if cfg.train.epochs is not None and data_vocab:
        resolved = _resolve_epochs(resolved, world_size, p)
    if cfg.train.resume_from:
        _check_resume_from(resolved, p)
    if cfg.train.init_from and adopt and not p:
        try:
            resolved = _adopt_init_model(resolved)
            p += check(resolved, world_size)
        except (FileNotFoundError, ValueError) as e:
            p.append(f"train.init_from: {e}")
    return resolved, p


def train_samples(cfg: Config) -> int:
    """Training samples in one pass over `cfg.data` (a blend: its sources' total), from
    each dataset's `meta.json`."""
    return sum(
        sum(shard_samples(read_meta_file(path), "train", cfg.train.seq_len))
        for _, path, _ in cfg.data.sources()
    )


def _resolve_epochs(cfg: Config, world_size: int, p: list[str]) -> Config:
    """train.max_steps for train.epochs passes: ceil(epochs x samples / global batch), the
    last update taking the batch that completes the last pass."""
    t = cfg.train
    global_batch = t.micro_batch_size * t.grad_accum * world_size
    try:
        samples = train_samples(cfg)
    except (OSError, ValueError, KeyError) as e:
        p.append(f"train.epochs: cannot count the training samples ({e})")
        return cfg
    if samples < 1:
        p.append(
            f"train.epochs={t.epochs}: the train split holds no sample of "
            f"train.seq_len={t.seq_len} + 1 tokens; use a shorter seq_len or more data"
        )
        return cfg
    steps = math.ceil(t.epochs * samples / global_batch)
    resolved = dataclasses.replace(cfg, train=dataclasses.replace(t, max_steps=steps))
    p += steps_problems(resolved)
    return resolved


def _check_resume_from(cfg: Config, p: list[str]) -> None:
    try:
        checkpoint.locate(cfg.train.out_dir, cfg.train.resume_from)
    except (FileNotFoundError, ValueError) as e:
        p.append(f"train.resume_from={e}")


def _package_problems(cfg: Config) -> list[str]:
    """The packages the chosen sinks and kernels need."""
    p = []
    for name in cfg.log.sinks:
        package = LOG_SINKS.get(name)
        if package and importlib.util.find_spec(package) is None:
            p.append(
                f"log.sinks: {name} needs the {package} package; `pip install {package}` "
                f"or drop {name!r} from log.sinks"
            )
    if cfg.model.kernels == "triton" and importlib.util.find_spec("triton") is None:
        p.append(
            "model.kernels=triton but triton is not installed; `pip install triton` "
            "or use model.kernels=auto (PyTorch fallback where Triton cannot run)"
        )
    return p


def _data_facts(cfg: Config, p: list[str]) -> tuple[int, bool]:
    """The largest vocabulary of the datasets `cfg.data` names (0 after noting a problem)
    and whether they are chat data (a loss mask); a blend's sources must agree on what
    their token ids mean and on their kind."""
    d = cfg.data
    if not d.path and not d.mix:
        p.append(
            "data.path is not set (prepare a dataset with `dsfm prepare` and pass data.path=DIR, "
            "or blend several with data.mix)"
        )
        return 0, False
    facts: dict[str, tuple] = {}
    for name, path, _ in d.sources():
        label = f"data.path={path}" if d.path else f"data.mix source {name!r} ({path or '?'})"
        try:
            meta = read_meta_file(path)
        except FileNotFoundError:
            p.append(f"{label}: no {META_FILE} there; is it a directory made by `dsfm prepare`?")
            continue
        except ValueError as e:
            p.append(str(e))
            continue
        digest = None
        if d.mix:  # sources must share the very tokenizer file
            if not tokenizer_file(path).is_file():
                p.append(f"{label}: {TOKENIZER_FILE} is missing; re-run `dsfm prepare`")
                continue
            digest = tokenizer_digest(path)
        facts[name] = (*(meta.get(k) for k in SHARED_META), digest)
    if not facts:
        return 0, False
    (first, ref), *rest = facts.items()
    for name, info in rest:
        diff = [f"{k} {a!r} vs {b!r}" for k, a, b in zip(SHARED_META, ref, info) if a != b]
        if info[-1] != ref[-1]:
            diff.append(f"{TOKENIZER_FILE} differs")
        if diff:
            p.append(
                f"data.mix sources {first!r} and {name!r} were prepared with different tokenizers "
                f"or data kinds ({'; '.join(diff[:3])}); prepare both with the same tokenizer "
                "(dsfm prepare --tokenizer FILE)"
            )
    chat = any(bool(info[SHARED_META.index("loss_mask")]) for info in facts.values())
    return max(int(info[0]) for info in facts.values()), chat


def _adopt_init_model(cfg: Config) -> Config:
    """With train.init_from the architecture is the source checkpoint's; only dropout and
    doc_mask (how we train, not what the model is) are ours, and the vocabulary grows to
    the data's when fine-tuning data added tokens (chat)."""
    src = from_dict(checkpoint.client_state(*checkpoint.resolve(cfg.train.init_from))["config"])
    model = dataclasses.replace(
        src.model,
        dropout=cfg.model.dropout,
        doc_mask=cfg.model.doc_mask,
        vocab_size=max(src.model.vocab_size, cfg.model.vocab_size),
    )
    return dataclasses.replace(cfg, model=model)
