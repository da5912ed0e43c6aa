"""The model's configuration: sizes, presets, LoRA and the rules they obey (no torch).

The model owns its config, as nanoGPT's GPTConfig sits beside its GPT: `gpt.py`, `sizes.py`
and `lora.py` read these dataclasses, and the training config (`dsfm/config/schema.py`)
takes them as its `model:` and `lora:` sections.

Design choices:
- Presets are a table of values, not code paths. Depth presets `dN` follow one rule (width =
  64 * depth, head size 64), so one knob scales the model; named presets pin sizes people
  compare against. Explicit fields override a preset's.
- Two sizes are derived when left None: `n_kv_heads` (= n_heads) and `ffn_hidden` (SwiGLU's
  8/3 * d_model rounded up to a multiple of 64, which keeps its three matrices at the
  parameter count of a 4*d GELU MLP). `filled()` is the one place they are derived.
- `doc_mask` is a training-time choice (how packed windows are attended), not part of the
  architecture: the weights and the Hugging Face export are the same either way. Its
  None is settled by the config's resolve step, which knows the data.
- `problems()` states every rule the sizes obey (heads divide the width, an even head size
  for RoPE, ...) in the config's words; the config check reports them with the rest, and
  `checked()` refuses a config that breaks one, so no model is built from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

KERNELS = ("auto", "triton", "torch")
# Hugging Face families whose blocks the model computes: llama and mistral are the same
# network under two names; qwen2 adds biases to the q/k/v projections.
FAMILIES = ("llama", "mistral", "qwen2")
ROPE_SCALINGS = ("linear", "llama3")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
    rope_scaling: str | None = None
    "RoPE frequency rescaling for longer contexts: None, linear, or llama3 (Llama 3.1+)."
    rope_factor: float = 1.0
    "rope_scaling's factor: how many times longer the context is than the original."
    rope_low_freq_factor: float = 1.0
    "llama3 scaling: wavelengths above original_len / this are divided by rope_factor."
    rope_high_freq_factor: float = 4.0
    "llama3 scaling: wavelengths below original_len / this are kept; between, blended."
    rope_original_max_len: int = 8192
    "llama3 scaling: the context length the unscaled frequencies were trained at."
    norm_eps: float = 1e-5
    "RMSNorm epsilon."
    tie_embeddings: bool = False
    "Share the token embedding with the LM head."
    family: str = "llama"
    "Hugging Face family: llama, mistral (same network), qwen2 (adds q/k/v biases); export's type."
    dropout: float = 0.0
    "Dropout on attention probabilities and residual branches (0 for pretraining)."
    init_std: float = 0.02
    "Std of the normal init; output projections are scaled by 1/sqrt(2 * n_layers)."
    kernels: str = "auto"
    "Fused ops: triton, torch, or auto (Triton on CUDA when installed, else PyTorch)."
    activation_checkpointing: bool = False
    "Recompute each block's activations in backward: less memory, about 1/3 more compute."
    doc_mask: bool | None = None
    "Attention and RoPE per packed document; None = on for chat data, off for pretraining."

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def qkv_bias(self) -> bool:
        """Whether the q/k/v projections have biases (o_proj never has one)."""
        return self.family == "qwen2"

    def filled(self) -> ModelConfig:
        """A copy with the derived sizes (n_kv_heads, ffn_hidden) filled in where None."""
        return dataclasses.replace(
            self,
            n_kv_heads=self.n_heads if self.n_kv_heads is None else self.n_kv_heads,
            ffn_hidden=swiglu_hidden(self.d_model) if self.ffn_hidden is None else self.ffn_hidden,
        )

    def problems(self) -> list[str]:
        """Every rule the sizes break. vocab_size 0 is allowed here: the data fills it."""
        p = []
        for name in ("n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                p.append(f"model.{name} must be >= 1, got {value}")
        heads, kv = self.n_heads, self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        if heads > 0 and self.d_model % heads:
            p.append(
                f"model.n_heads={heads} does not divide model.d_model={self.d_model} "
                f"(pick n_heads so that d_model / n_heads is a whole head size, e.g. "
                f"{max(1, self.d_model // 64)})"
            )
        elif heads > 0 and self.head_dim % 2:
            p.append(f"head size d_model/n_heads = {self.head_dim} is odd; RoPE needs an even one")
        if kv > 0 and heads > 0 and heads % kv:
            p.append(
                f"model.n_kv_heads={kv} does not divide model.n_heads={heads} "
                "(each key/value head serves a whole group of query heads)"
            )
        if self.kernels not in KERNELS:
            p.append(f"model.kernels must be one of {', '.join(KERNELS)}, got {self.kernels!r}")
        if not 0.0 <= self.dropout < 1.0:
            p.append(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.family not in FAMILIES:
            p.append(f"model.family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if self.rope_scaling is not None:
            if self.rope_scaling not in ROPE_SCALINGS:
                p.append(
                    f"model.rope_scaling must be null or one of {', '.join(ROPE_SCALINGS)}, "
                    f"got {self.rope_scaling!r}"
                )
            if self.rope_factor < 1.0:
                p.append(f"model.rope_factor must be >= 1, got {self.rope_factor}")
            if self.rope_scaling == "llama3" and not (
                0 < self.rope_low_freq_factor < self.rope_high_freq_factor
                and self.rope_original_max_len >= 1
            ):
                p.append(
                    "llama3 RoPE scaling needs 0 < model.rope_low_freq_factor < "
                    f"model.rope_high_freq_factor and model.rope_original_max_len >= 1; got "
                    f"{self.rope_low_freq_factor}, {self.rope_high_freq_factor}, "
                    f"{self.rope_original_max_len}"
                )
        return p

    def checked(self) -> ModelConfig:
        """`filled()`, refusing a config that breaks a rule or has no vocabulary yet: what a
        model is built from."""
        p = self.problems()
        if self.vocab_size <= 0:
            p.insert(0, f"model.vocab_size must be positive, got {self.vocab_size}")
        if p:
            raise ValueError("invalid model config: " + "; ".join(p))
        return self.filled()


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

    def problems(self) -> list[str]:
        p = []
        if self.rank < 0 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0:
            p.append(
                f"lora: rank must be >= 0, alpha > 0 and dropout in [0, 1); got "
                f"rank={self.rank}, alpha={self.alpha}, dropout={self.dropout}"
            )
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown:
            p.append(f"lora.targets: unknown {unknown} (choose from {list(LORA_TARGETS)})")
        return p


def swiglu_hidden(d_model: int, multiple_of: int = 64) -> int:
    """8/3 * d_model rounded up to a multiple of `multiple_of`."""
    hidden = int(8 * d_model / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _depth_preset(depth: int) -> dict:
    d_model = 64 * depth
    return {"n_layers": depth, "d_model": d_model, "n_heads": d_model // 64, "max_seq_len": 2048}


PRESETS: dict[str, dict] = {f"d{n}": _depth_preset(n) for n in (2, 4, 6, 8, 12, 16, 20, 24, 32)}
PRESETS.update(
    {
        # The sizes used in the speed issue's measurements.
        "135m": {
            "n_layers": 12,
            "d_model": 768,
            "n_heads": 12,
            "n_kv_heads": 12,
            "ffn_hidden": 2048,
            "max_seq_len": 2048,
        },
        "1.4b": {
            "n_layers": 24,
            "d_model": 2048,
            "n_heads": 16,
            "n_kv_heads": 16,
            "ffn_hidden": 5632,
            "max_seq_len": 2048,
        },
    }
)
