"""Numbers as people read them: counts (134M), durations (2h05m), and which values are real.

One home for the formats every table and summary prints (`dsfm runs`, `dsfm plan`, the
end-of-run summary, plot axes), so the same quantity reads the same everywhere.
"""

from __future__ import annotations

import math
from typing import Any


def finite_or_none(x: Any) -> float | None:
    """`x` when it is a finite real number (not a bool), else None."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return x


def is_finite(x: Any) -> bool:
    return finite_or_none(x) is not None


def human(n: float | None) -> str:
    """1234567 -> 1.23M: counts and rates at a glance (three significant digits)."""
    if n is None:
        return "-"
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.3g}" if isinstance(n, float) else str(n)


def scientific(x: float) -> str:
    """0.0025 -> 2.5e-3: learning rates as configs write them (two significant digits)."""
    if x == 0:
        return "0"
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def duration(seconds: float | None) -> str:
    """< 1 s, 12.3 s, 5m03s, 2h05m, 3d04h."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return "< 1 s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"
