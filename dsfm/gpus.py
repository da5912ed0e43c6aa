"""Accelerators we know: dense bf16 peak FLOP/s and memory, one table (torch-free).

MFU finds the peak by substring of the CUDA device name (`peak_flops`: "A100" also
matches "NVIDIA A100-SXM4-40GB"); `dsfm plan` looks cards up by these names. Memory is
the card's marketed size, read as GiB. V100 has no bf16: its entry is the fp16 peak.
"""

from __future__ import annotations

# name: (dense bf16 tensor-core peak FLOP/s, memory GiB). Order matters for substring
# lookup: the first name found in the device name wins.
GPUS: dict[str, tuple[float, float]] = {
    "H200": (989e12, 141),
    "H100": (989e12, 80),
    "A100": (312e12, 80),
    "A100-40GB": (312e12, 40),
    "L40S": (362e12, 48),
    "A10G": (125e12, 24),
    "RTX 4090": (165e12, 24),
    "RTX 3090": (71e12, 24),
    "RTX 4060": (60e12, 8),
    "V100": (125e12, 32),
}


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of the card a CUDA device name describes ("NVIDIA H100 80GB HBM3")."""
    return next((peak for known, (peak, _) in GPUS.items() if known in device_name), None)


def _key(name: str) -> str:
    return "".join(c for c in name.upper() if c.isalnum())


def find_gpu(name: str) -> tuple[str, float, float]:
    """(table name, peak FLOP/s, memory GiB) for a name as typed ("h100", "rtx4090", ...)."""
    for known, (peak, mem) in GPUS.items():
        if _key(known) == _key(name):
            return known, peak, mem
    raise ValueError(
        f"unknown GPU {name!r}; known: {', '.join(GPUS)} "
        "(for another card pass --gpu-mem GB instead of --gpu)"
    )
