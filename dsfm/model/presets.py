"""Model size presets: a table of values, not code paths.

Depth presets `dN` follow one rule (width = 64 * depth, head dim 64), so one knob
scales the model; the SwiGLU hidden size (8/3 * width, rounded up to a multiple of 64)
and n_kv_heads (= n_heads) are derived by the config loader, so overriding d_model or
n_heads on top of a preset stays consistent. Named presets pin sizes people compare
against. Pure data: importing this needs no torch.
"""

from __future__ import annotations


def _depth_preset(depth: int) -> dict:
    d_model = 64 * depth
    return {
        "n_layers": depth,
        "d_model": d_model,
        "n_heads": d_model // 64,
        "max_seq_len": 2048,
    }


def _swiglu_hidden(d_model: int, multiple_of: int = 64) -> int:
    # SwiGLU has three matrices; 8/3 * d keeps its parameter count equal to a 4*d GELU MLP.
    hidden = int(8 * d_model / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


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
