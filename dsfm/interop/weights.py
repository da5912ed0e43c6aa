"""Model weights out of any checkpoint, and plain checkpoints: what merge and import write.

A plain checkpoint is one tag directory (`dsfm.train.checkpoint` names its client state,
manifest and tokenizer) whose weights are `model.safetensors` instead of DeepSpeed's
files: a starting point for fine-tuning or continued pretraining (`train.init_from`), and
what export reads as readily as a training tag.

Design choices:
- `load_weights` gives full fp32 weights with the model's own names from either kind of tag:
  a ZeRO tag is consolidated on the CPU in one process (`dsfm.train.engine`, the one module
  that imports deepspeed); LoRA adapters are folded in when the tag's config says LoRA, so
  callers always see plain Llama weights.
- Weights are checked against a shape-only (meta device) model of the tag's own config
  before anyone loads them, so a mismatch names the tensors instead of failing in torch.
- `TensorSource` reads one tensor at a time, for building a model module by module (ZeRO-3
  partitioned construction): a plain checkpoint's safetensors are read lazily, so the
  whole model is never in memory; a DeepSpeed tag's weights are consolidated once (ZeRO
  shards are flat partitions of every tensor), so merge or export such a tag first to
  start a model too large for one host's memory from it.
- A plain checkpoint is written whole or not at all (`dsfm.atomic`), and an existing
  directory is refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dsfm.atomic import staged_dir
from dsfm.config.load import from_dict
from dsfm.data.tokenizer import Tokenizer, copy_tokenizer
from dsfm.model.config import ModelConfig
from dsfm.model.gpt import GPT
from dsfm.model.lora import LORA_PARAMS, merge_state_dict
from dsfm.train import checkpoint

PLAIN_WEIGHTS = "model.safetensors"


def save_plain(
    out_dir: str | Path,
    weights: dict[str, torch.Tensor],
    state: dict[str, Any],
    tokenizer_path: str | Path,
) -> Path:
    """A plain checkpoint: weights, client state (`state` must hold the resolved "config"),
    the tokenizer and a manifest."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    with staged_dir(out) as tmp:
        # clone: safetensors refuses tensors sharing storage (tied embeddings)
        tensors = {k: v.detach().cpu().clone() for k, v in weights.items()}
        save_file(tensors, str(tmp / PLAIN_WEIGHTS))
        os.chmod(tmp / PLAIN_WEIGHTS, 0o644)  # safetensors writes 0600; match the other files
        checkpoint.write_client_state(tmp, state)
        copy_tokenizer(tokenizer_path, tmp)
        checkpoint.write_manifest(tmp)
    return out


def load_weights(ckpt_dir: Path, tag: str, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a DeepSpeed tag (any ZeRO stage) or a plain checkpoint."""
    weights = load_unmerged(ckpt_dir, tag, state)
    lora = state["config"]["lora"]
    if lora["rank"] > 0:  # adapters folded in: callers always see plain Llama weights
        weights = merge_state_dict(weights, lora["alpha"] / lora["rank"])
    return weights


def load_unmerged(ckpt_dir: Path, tag: str, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The fp32 tensors as stored: a LoRA run's adapters stay beside its base weights."""
    plain = ckpt_dir / tag / PLAIN_WEIGHTS
    if plain.is_file():
        from safetensors.torch import load_file

        return {k: v.float() for k, v in load_file(str(plain)).items()}
    from dsfm.config.deepspeed import zero_stage
    from dsfm.train.engine import consolidated_state_dict

    return consolidated_state_dict(ckpt_dir, tag, zero_stage(state["ds_config"]))


class TensorSource:
    """The fp32 tensors of a checkpoint tag by name, read one at a time where the format
    allows (see the module doc)."""

    def __init__(self, ckpt_dir: Path, tag: str, state: dict[str, Any]):
        self.where = ckpt_dir / tag
        self._plain = self.where / PLAIN_WEIGHTS
        self._weights = None
        if self._plain.is_file():
            from safetensors import safe_open

            with safe_open(str(self._plain), framework="pt") as f:
                self.shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        else:
            self._weights = load_weights(ckpt_dir, tag, state)
            self.shapes = {k: tuple(v.shape) for k, v in self._weights.items()}

    def get(self, name: str) -> torch.Tensor:
        if self._weights is not None:
            return self._weights[name]
        from safetensors import safe_open

        # Opened per tensor: safetensors maps the whole file, and every page read stays
        # resident in this process while the file is open (as much memory as the model).
        with safe_open(str(self._plain), framework="pt") as f:
            return f.get_tensor(name).float().clone()

    def check_fits(self, shapes: dict[str, tuple[int, ...]], tied: bool) -> None:
        """ValueError unless every tensor of a model with `shapes` is here with its shape;
        the vocabulary (embedding and LM-head rows) may have grown."""
        grows = ("embed_tokens.weight", "lm_head.weight")
        problems = []
        for name, shape in shapes.items():
            have = self.shapes.get(name)
            if have is None:
                if not (tied and name == "lm_head.weight"):
                    problems.append(f"{name} missing")
            elif have != shape and not (
                name in grows and have[1:] == shape[1:] and have[0] <= shape[0]
            ):
                problems.append(f"{name} {have} != {shape}")
        unexpected = sorted(
            set(self.shapes) - set(shapes) - ({"lm_head.weight"} if tied else set())
        )
        if unexpected:
            problems.append(f"unexpected {', '.join(unexpected[:5])}")
        if problems:
            raise ValueError(f"weights in {self.where} do not fit the model: {'; '.join(problems)}")

    @torch.no_grad()
    def fill(self, name: str, module: torch.nn.Module) -> None:
        """Copy `module`'s own parameters from the checkpoint; rows a grown vocabulary adds
        start at the mean of the checkpoint's rows, so each old id predicts what it did and
        a new token's logit starts near the average."""
        for pname, param in module.named_parameters(recurse=False):
            key = f"{name}.{pname}" if name else pname
            if key not in self.shapes:  # a tied LM head: the embedding's tensor
                continue
            src = self.get(key)
            param[: len(src)].copy_(src)
            param[len(src) :].copy_(src.mean(0).expand_as(param[len(src) :]))


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape a GPT of `cfg` has, in module order (nothing allocated)."""
    with torch.device("meta"):
        model = GPT(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_weights(weights: dict[str, torch.Tensor], cfg: ModelConfig, where: str) -> None:
    """Raise ValueError unless `weights` are exactly the tensors of a GPT of `cfg` (a tied
    LM head may be absent)."""
    lora = sorted(k for k in weights if k.endswith(LORA_PARAMS))
    if lora:
        raise ValueError(
            f"{where} holds unmerged LoRA adapters ({lora[0]}, ... {len(lora)} tensors); "
            "Hugging Face Llama has no place for them: run `dsfm merge CHECKPOINT --out DIR` "
            "and export the merged checkpoint"
        )
    shapes = expected_shapes(cfg)
    optional = {"lm_head.weight"} if cfg.tie_embeddings else set()
    missing = sorted(set(shapes) - set(weights) - optional)
    unexpected = sorted(set(weights) - set(shapes))
    wrong = [
        f"{k} {tuple(weights[k].shape)} != {shapes[k]}"
        for k in shapes
        if k in weights and tuple(weights[k].shape) != shapes[k]
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"weights in {where} do not fit the model config (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shapes {wrong[:5]})"
        )


def load_into(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: Path) -> None:
    """Strict load (of any module: a LoRA model takes its adapters too) that tolerates a tied
    LM head being absent; a clear error otherwise."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = getattr(model, "cfg", None) is not None and model.cfg.tie_embeddings
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(
            f"weights in {where} do not fit the model (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]})"
        )


def load_model(path: str | Path, dtype: str = "fp32") -> tuple[GPT, Tokenizer]:
    """(GPT in eval mode, Tokenizer) from any ZeRO stage's checkpoint or a plain one."""
    ckpt_dir, tag = checkpoint.resolve(path)
    state = checkpoint.client_state(ckpt_dir, tag)
    model = GPT(from_dict(state["config"]).model)
    load_into(model, load_weights(ckpt_dir, tag, state), ckpt_dir / tag)
    model.to(torch.bfloat16 if dtype == "bf16" else torch.float32).eval()
    return model, Tokenizer.load(ckpt_dir / tag)
