"""LoRA adapters and their merging, in plain torch.

Design choices:
- Our own small module, no peft: `LoRALinear` *is* an `nn.Linear` that keeps its frozen
  `weight` (and bias) under the original name and adds `lora_A` (r x in) and `lora_B`
  (out x r) beside it. State-dict names stay the Hugging Face ones
  (`layers.0.self_attn.q_proj.weight`) with `.lora_A`/`.lora_B` siblings, so export after
  a merge is the usual rename and a LoRA checkpoint loads into a model with LoRA applied.
- `y = x W^T + dropout(x) A^T B^T * alpha/r` (Hu et al. 2021): A is kaiming-uniform like a
  fresh nn.Linear, B is zero, so at init the adapted model computes exactly the base model,
  and alpha/r keeps the update's scale fixed when r changes.
- `apply_lora` wraps the existing weight tensor, never copies it, and freezes every other
  parameter (embeddings, norms, lm_head): the optimizer then only sees the adapters. A
  weight shared by two modules (a tied lm_head) is refused as a target, because merging a
  delta into it would also change the embedding it is tied to.
- Merging folds `B @ A * alpha/r` into the weight in fp32 and casts back once, so a bf16
  model loses no more precision than one rounding. It works on a state dict
  (`merge_state_dict`), so `dsfm merge` and export need no model instance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dsfm.model.config import LORA_TARGETS

LORA_PARAMS = ("lora_A", "lora_B")


class LoRALinear(nn.Linear):
    """A frozen `nn.Linear` plus a trainable low-rank update; built from an existing layer."""

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float, dropout: float = 0.0):
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if not 0 <= dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        # On the meta device nn.Linear allocates and initialises nothing; the weight we
        # keep is `base`'s own Parameter, so the adapted model holds no second copy.
        super().__init__(
            base.in_features, base.out_features, bias=base.bias is not None, device="meta"
        )
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A as nn.Linear inits its weight, B = 0: the update starts at exactly zero."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (..., out)
        return base + update * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def _merge(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> torch.Tensor:
    delta = lora_B.float() @ lora_A.float()  # (out, in)
    return (weight.float() + delta * scaling).to(weight.dtype)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _shared_parameters(model: nn.Module) -> set[int]:
    """ids of parameters reachable under more than one name (tied weights)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {pid for pid, n in seen.items() if n > 1}


def apply_lora(
    model: nn.Module,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: Sequence[str] = LORA_TARGETS,
) -> list[str]:
    """Swap the `nn.Linear` modules whose names end in `targets` for `LoRALinear`, in place.

    Every other parameter is frozen. Returns the names of the replaced modules.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ValueError(f"no LoRA targets given; choose from {list(LORA_TARGETS)}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("model already has LoRA adapters; merge them before applying again")
    linears = {name: m for name, m in model.named_modules() if name and isinstance(m, nn.Linear)}
    unknown = [t for t in targets if not any(_matches(name, t) for name in linears)]
    if unknown:
        valid = sorted({name.rsplit(".", 1)[-1] for name in linears})
        raise ValueError(f"unknown LoRA targets {unknown}; this model's linear layers are {valid}")

    shared = _shared_parameters(model)
    replaced = [name for name in linears if any(_matches(name, t) for t in targets)]
    for name in replaced:
        if id(linears[name].weight) in shared:
            raise ValueError(
                f"{name}.weight is shared with another module (tied embeddings?); "
                f"LoRA on it would change both when merged, so leave {name} out of targets"
            )
    for name in replaced:
        parent_name, _, child = name.rpartition(".")
        lora = LoRALinear(linears[name], rank=rank, alpha=alpha, dropout=dropout)
        setattr(model.get_submodule(parent_name), child, lora)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(LORA_PARAMS))
    return replaced


def merge_state_dict(
    sd: dict[str, torch.Tensor], alpha_over_rank: float
) -> dict[str, torch.Tensor]:
    """A plain state dict with each `X.lora_A`/`X.lora_B` pair folded into `X.weight`.

    The result has exactly the base model's names; `sd` is not modified.
    """
    merged = {k: v for k, v in sd.items() if not k.endswith(LORA_PARAMS)}
    prefixes = {k.rsplit(".", 1)[0] for k in sd if k.endswith(LORA_PARAMS)}
    for prefix in sorted(prefixes):
        missing = [f"{prefix}.{p}" for p in ("weight", *LORA_PARAMS) if f"{prefix}.{p}" not in sd]
        if missing:
            raise KeyError(f"cannot merge {prefix}: state dict has no {missing}")
        merged[f"{prefix}.weight"] = _merge(
            sd[f"{prefix}.weight"], sd[f"{prefix}.lora_A"], sd[f"{prefix}.lora_B"], alpha_over_rank
        )
    return merged
