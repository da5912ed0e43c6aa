"""dsfm: train decoder-only transformer language models from scratch on DeepSpeed.

Besides the `dsfm` command, a small library for a training loop of your own (the CS336
way): `get_batch`, `load_tokens`, `save_checkpoint`, `load_checkpoint` (docs/own-loop.md).
They are imported on first use (module `__getattr__`), so `import dsfm` and the command
line start without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> the module that defines it
_LIBRARY = {
    "get_batch": "dsfm.data.batch",
    "load_tokens": "dsfm.data.batch",
    "save_checkpoint": "dsfm.interop.statefile",
    "load_checkpoint": "dsfm.interop.statefile",
}
__all__ = ["__version__", *_LIBRARY]


def __getattr__(name: str) -> Any:
    if name not in _LIBRARY:
        raise AttributeError(f"module 'dsfm' has no attribute {name!r}")
    return getattr(importlib.import_module(_LIBRARY[name]), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_LIBRARY})
