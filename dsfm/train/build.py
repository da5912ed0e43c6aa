"""What a run trains: the model (fresh, or `train.init_from`'s weights, with LoRA) and its data.

Design choices:
- Every rank builds the same model from the same seed (`seed_everything` before building).
- Under ZeRO-3 the model is built partitioned (`engine.build_model`): no rank ever holds it
  whole, so a model larger than one host's memory can be trained. Its weights are then
  drawn, or read from `train.init_from`, one module at a time (`engine.fill_modules`);
  the model's own init is seeded per module name, so the values equal a whole build's.
- With `train.init_from` the model starts from the source checkpoint's weights (any ZeRO
  stage's tag, or a plain checkpoint, read tensor by tensor); when fine-tuning data added
  tokens (chat), the model is built at the data's vocabulary and the new embedding and
  LM-head rows start at the mean of the old ones.
- `data.path` is one dataset; `data.mix` a blend, shuffled per source for training, and
  for validation each source's first samples (the same every eval).
- Data a run is given raw (`dsfm train --data corpus.txt`), or no data at all (the
  embedded corpus), becomes `data.path` before the configs are resolved (`data_overrides`):
  a cached dataset (`dsfm.data.cache`) in RUN/data/ or in $DSFM_CACHE (~/.cache/dsfm).
  Local rank 0 of each node prepares it; the other ranks wait for it.
"""

from __future__ import annotations

import ctypes
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from dsfm.config.deepspeed import zero_stage
from dsfm.config.load import load_config, parse_config
from dsfm.config.schema import Config
from dsfm.data import cache
from dsfm.data.blend import BlendedDataset, open_split
from dsfm.data.corpus import STDLIB
from dsfm.data.dataset import TokenDataset
from dsfm.data.format import check_content, is_dataset_dir, read_meta
from dsfm.distributed.env import is_rank0, local_rank
from dsfm.interop.weights import TensorSource
from dsfm.model.gpt import GPT
from dsfm.model.lora import apply_lora
from dsfm.observe import rundir
from dsfm.train import checkpoint
from dsfm.train import engine as ds_engine


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: Config, ds: dict[str, Any]) -> GPT:
    """A fresh model, or train.init_from's weights (vocabulary grown to the data's); LoRA if
    asked. Partitioned across ranks under ZeRO-3 (see the module doc)."""
    partitioned = zero_stage(ds) == 3
    if partitioned:
        return_freed_memory()
    model = ds_engine.build_model(lambda: GPT(cfg.model), ds)
    src_vocab = cfg.model.vocab_size
    if cfg.train.init_from is not None:
        ckpt_dir, tag = checkpoint.resolve(cfg.train.init_from)
        state = checkpoint.client_state(ckpt_dir, tag)
        src_vocab = state["config"]["model"]["vocab_size"]
        source = TensorSource(ckpt_dir, tag, state)
        source.check_fits(ds_engine.param_shapes(model), cfg.model.tie_embeddings)
        ds_engine.fill_modules(model, source.fill, partitioned)
    elif partitioned:  # the values drawn while building were partitioned away
        ds_engine.fill_modules(model, model.init_module, partitioned)
    if cfg.lora.rank > 0:
        apply_lora(
            model,
            rank=cfg.lora.rank,
            alpha=cfg.lora.alpha,
            dropout=cfg.lora.dropout,
            targets=cfg.lora.targets,
        )
        if model.cfg.vocab_size > src_vocab:
            # New tokens (chat) start as identical mean rows; frozen they could never be told
            # apart or produced, so embedding and head train in full (peft's modules_to_save).
            model.embed_tokens.weight.requires_grad_(True)
            model.lm_head.weight.requires_grad_(True)
    return model


def return_freed_memory(threshold: int = 1 << 20) -> None:
    """Have glibc map blocks from `threshold` bytes up on their own, so freeing one gives the
    memory back to the OS. By default glibc raises that threshold (up to 32 MB) as large
    blocks are freed and keeps later ones in its heap, where the full-size tensors a
    partitioned build frees, one per module, leave holes adding up to a second half of the
    model per rank (measured: +505 MB for a 316 MB partition, +323 MB with this). A no-op
    off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD; setting it also stops its adjustment


def check_data(cfg: Config, say: Callable[[str], None]) -> None:
    """Every dataset's token files against the hashes in its meta.json (`format.check_content`:
    cached, so only a dataset new or changed since its last check is read); ValueError
    naming the file, offset and fix."""
    for _, path, _ in cfg.data.sources():
        start = time.perf_counter()
        if hashed := check_content(path, read_meta(path), say):
            say(
                f"verified {hashed / 1e6:,.1f} MB of tokens in {path} against their sha256 "
                f"({time.perf_counter() - start:.1f} s, once: cached until they change)"
            )


def open_data(
    cfg: Config, split: str, warn: Callable[[str], None] | None = None
) -> TokenDataset | BlendedDataset:
    """`data.path`'s split, or the blend of `data.mix`'s (shuffled per source for training;
    validation takes each source's first samples, the same every eval)."""
    if not cfg.data.mix:
        return TokenDataset(cfg.data.path, split, cfg.train.seq_len)
    seed = cfg.train.seed if split == "train" else None
    return open_split(cfg.data.sources(), split, cfg.train.seq_len, seed, warn)


def open_val(
    cfg: Config, world: int, warn: Callable[[str], None]
) -> TokenDataset | BlendedDataset | None:
    """The val split, or None (after `warn`ing why, and what that turns off) when there is
    none to validate on."""
    off = "validation, the best checkpoint and early stopping (eval.patience) are off"
    try:
        data = open_data(cfg, "val", warn=warn)
    except ValueError as e:
        warn(f"{off}: {e}")
        return None
    if len(data) < world:
        warn(f"{off}: the validation split has {len(data)} samples for {world} ranks")
        return None
    return data


def data_overrides(config_path: str | None, overrides: list[str], data: str | None) -> list[str]:
    """`data.path=DIR` for a run whose data is `--data` (a prepared dataset, or raw text to
    prepare into RUN/data/), or which names no data (the embedded corpus, prepared into
    the user's cache); nothing when the config names its data. `--data` replaces the YAML's
    data, as any command-line value does; with `data.path=`/`data.mix=` also on the command
    line it is refused."""
    named = {o.split("=", 1)[0].strip() for o in overrides}
    if data and named & {"data.path", "data.mix"}:
        raise ValueError(
            f"--data {data} and {' and '.join(sorted(named & {'data.path', 'data.mix'}))}= on "
            "the command line both name the training data; pass one of them"
        )
    if not data:
        named, _ = parse_config(config_path, overrides)
        if named.data.path or named.data.mix:
            return []  # the resolve step reports all of this config's problems at once
    cfg = load_config(config_path, overrides)  # a config with problems stops before preparing
    replace = ["data.mix=[]"] if cfg.data.mix else []  # the YAML's blend gives way to --data
    if data and is_dataset_dir(data):
        return [*replace, f"data.path={data}"]
    inputs, root = ([data], rundir.data_dir(cfg.train.out_dir)) if data else ([STDLIB], None)
    path = cache.prepared(
        inputs,
        root or cache.default_root(),
        vocab_size=cfg.model.vocab_size or None,
        prepare_here=local_rank() == 0,
        say=lambda line: print(line, flush=True),  # the preparer of each node speaks
        progress=is_rank0(),
    )
    return [*replace, f"data.path={path}"]
