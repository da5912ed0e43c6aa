"""The GPU tier: `pytest -m gpu` on one CUDA machine is the whole GPU check.

Every test under tests/gpu/ is marked `gpu` and skipped, with the reason, where torch sees
no CUDA device (CI, laptops); the rest of the suite never needs a GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE not in Path(item.fspath).parents:
            continue
        item.add_marker(pytest.mark.gpu)
        if not torch.cuda.is_available():
            item.add_marker(
                pytest.mark.skip(reason="needs a CUDA GPU (the GPU tier: pytest -m gpu)")
            )
