"""Checkpoints: DeepSpeed-sharded engine state plus our client state, one tag per directory.

Layout: `<run>/checkpoints/<tag>/` written by `engine.save_checkpoint` (model and ZeRO
optimizer shards, LR scheduler), with `latest` naming the newest resumable tag. Step
tags are `step_00001000`; `best` (lowest val loss) and `final` are extra tags. The
client state (step, consumed samples, tokens, best val loss, resolved configs) is a small
`dsfm_state.json` in the tag, readable without loading any weights, so a resume can be
checked against the config before an engine is built. Each rank also writes its own RNG
state. The tokenizer is copied into every tag so a checkpoint is self-describing.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsfm import dist

STEP_TAG = re.compile(r"^step_(\d+)$")
STATE_FILE = "dsfm_state.json"
PLAIN_WEIGHTS = "model.safetensors"


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(
    engine: Any,
    ckpt_dir: Path,
    tag: str,
    client_state: dict[str, Any],
    *,
    tokenizer_path: Path | None = None,
    update_latest: bool = True,
) -> None:
    """Every rank calls this (ZeRO shards are written by their owners)."""
    tag_dir = ckpt_dir / tag
    if dist.is_rank0():
        tag_dir.mkdir(parents=True, exist_ok=True)
        (tag_dir / STATE_FILE).write_text(json.dumps(client_state, indent=1))
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tag_dir / "tokenizer.json")
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=update_latest)
    torch.save(rng_state(), tag_dir / f"rng_rank{dist.rank()}.pt")


def load(engine: Any, ckpt_dir: Path, tag: str | None = None) -> dict[str, Any] | None:
    """Load `tag` (default: `latest`) into the engine; return the client state or None."""
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        return None
    state = client_state(ckpt_dir, tag)
    path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    rng_file = ckpt_dir / tag / f"rng_rank{dist.rank()}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than saved
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def latest_tag(ckpt_dir: Path) -> str | None:
    f = ckpt_dir / "latest"
    return f.read_text().strip() if f.is_file() else None


def prune(ckpt_dir: Path, keep_last: int) -> list[str]:
    """Delete all but the newest `keep_last` step tags; never `latest`'s target, best or final."""
    protected = {latest_tag(ckpt_dir)}
    steps = sorted(
        (int(m.group(1)), p.name)
        for p in ckpt_dir.iterdir()
        if p.is_dir() and (m := STEP_TAG.match(p.name))
    )
    doomed = [name for _, name in steps[:-keep_last] if name not in protected]
    for name in doomed:
        shutil.rmtree(ckpt_dir / name, ignore_errors=True)
    return doomed


def resolve(path: str | Path) -> tuple[Path, str]:
    """A run dir, a checkpoints dir or a tag dir -> (checkpoints dir, tag)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"{p} does not exist (pass a run directory, its checkpoints/ "
            "directory, or one checkpoint tag directory)"
        )
    if (p / STATE_FILE).is_file():
        return p.parent, p.name
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    tag = latest_tag(p)
    if tag is None or not (p / tag / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"no complete checkpoint under {p} (no `latest` file pointing "
            "at a saved tag); has the run saved one yet?"
        )
    return p, tag


def client_state(ckpt_dir: Path, tag: str) -> dict[str, Any]:
    """The client state of a tag, read without loading any weights."""
    f = ckpt_dir / tag / STATE_FILE
    if not f.is_file():
        raise FileNotFoundError(
            f"{ckpt_dir / tag} has no {STATE_FILE}: not a complete dsfm "
            "checkpoint (interrupted save, or written by another tool)"
        )
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is corrupt ({e}); resume from an earlier tag") from None


def save_plain(
    out_dir: str | Path,
    weights: dict[str, torch.Tensor],
    state: dict[str, Any],
    tokenizer_path: str | Path,
) -> Path:
    """A plain checkpoint: `model.safetensors` + `dsfm_state.json` + `tokenizer.json`.

    What merge and import write, and a starting point for fine-tuning or continued
    pretraining. `state` must hold the resolved "config". Written to a temp dir and renamed,
    so a failure leaves nothing; an existing directory is refused.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new output directory")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        # clone: safetensors refuses tensors sharing storage (tied embeddings)
        tensors = {k: v.detach().cpu().clone() for k, v in weights.items()}
        save_file(tensors, str(tmp / PLAIN_WEIGHTS))
        os.chmod(tmp / PLAIN_WEIGHTS, 0o644)  # safetensors writes 0600; match the other files
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_weights(ckpt_dir: Path, tag: str, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a DeepSpeed tag (any ZeRO stage) or a plain checkpoint."""
    plain = ckpt_dir / tag / PLAIN_WEIGHTS
    if plain.is_file():
        from safetensors.torch import load_file

        weights = {k: v.float() for k, v in load_file(str(plain)).items()}
    else:
        from dsfm.engine import consolidated_state_dict, zero_stage

        weights = consolidated_state_dict(ckpt_dir, tag, zero_stage(state["ds_config"]))
    lora = state["config"].get("lora", {})
    if lora.get("rank", 0) > 0:  # adapters folded in: callers always see plain Llama weights
        from dsfm.lora import merge_state_dict

        weights = merge_state_dict(weights, lora["alpha"] / lora["rank"])
    return weights


def load_into(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: Path) -> None:
    """Strict load that tolerates a tied LM head being absent; clear error otherwise."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = getattr(model, "cfg", None) is not None and model.cfg.tie_embeddings
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(
            f"weights in {where} do not fit the model (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]})"
        )


def load_model(path: str | Path, dtype: str = "fp32") -> tuple[Any, Any]:
    """(GPT in eval mode, Tokenizer) from any ZeRO stage's checkpoint or a plain one."""
    from dsfm.config import from_dict
    from dsfm.model.gpt import GPT
    from dsfm.tokenizer import Tokenizer

    ckpt_dir, tag = resolve(path)
    state = client_state(ckpt_dir, tag)
    cfg = from_dict(state["config"])
    model = GPT(cfg.model)
    load_into(model, load_weights(ckpt_dir, tag, state), ckpt_dir / tag)
    model.to(torch.bfloat16 if dtype == "bf16" else torch.float32).eval()
    return model, Tokenizer.load(ckpt_dir / tag)
