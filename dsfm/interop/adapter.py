"""LoRA adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Design choices:
- dsfm's LoRA is PEFT's plain LoRA: `lora_A` (r x in) and `lora_B` (out x r) beside each
  target's weight, scaled by alpha / r, so the translation is names only. PEFT keys are
  the Hugging Face module names under `base_model.model.` with `.weight` after
  `lora_A`/`lora_B`; `r`, `lora_alpha`, `lora_dropout` and `target_modules` are the run's
  `lora:` section. No rsLoRA, DoRA or bias training.
- When the run's vocabulary grew over its base (chat tokens), its embedding and LM head
  trained in full; they go into the adapter file under their own names, as PEFT's
  `save_embedding_layers` writes them, and the user resizes the base's embeddings to the
  tokenizer before loading (PEFT's documented path for added tokens).
- This module names the files and keys; `dsfm.interop.hf.export_adapter` picks the tensors
  (Hugging Face names) and writes the tokenizer beside them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def peft_name(hf_name: str) -> str:
    """`model.layers.0.self_attn.q_proj.lora_A` -> PEFT's saved key for the same tensor."""
    if hf_name.endswith((".lora_A", ".lora_B")):
        hf_name += ".weight"
    return PEFT_PREFIX + hf_name


def adapter_config(lora: dict[str, Any], base: str | None) -> dict[str, Any]:
    """PEFT's LoraConfig for a run's `lora:` section (`base`: where the base model lives)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": lora["rank"],
        "lora_alpha": lora["alpha"],
        "lora_dropout": lora["dropout"],
        "target_modules": sorted(lora["targets"]),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
        "init_lora_weights": True,
    }


def write_adapter(
    out: Path,
    tensors: dict[str, torch.Tensor],
    lora: dict[str, Any],
    base: str | None,
    dtype: torch.dtype,
) -> None:
    """Write the adapter files into the directory `out` (tensors under Hugging Face names)."""
    from safetensors.torch import save_file

    saved = {peft_name(k): v.detach().to(dtype, copy=True).contiguous() for k, v in tensors.items()}
    save_file(saved, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(lora, base), indent=2) + "\n")
    os.chmod(out / ADAPTER_WEIGHTS, 0o644)  # safetensors writes 0600; match the JSON
