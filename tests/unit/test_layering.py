"""The architecture as drawn: deepspeed only in engine.py, no distributed code in the model."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "dsfm"


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_only_engine_imports_deepspeed():
    importers = {p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py")
                 if any(m.split(".")[0] == "deepspeed" for m in imported_modules(p))}
    assert importers == {"engine.py"}


def test_model_file_is_plain_torch():
    mods = imported_modules(PKG / "model" / "gpt.py")
    assert not any(m.startswith(("torch.distributed", "deepspeed", "dsfm.engine", "dsfm.trainer"))
                   for m in mods), mods


def test_config_does_not_import_torch():
    # config is the bottom layer: loading and validating must not need torch or deepspeed
    assert not any(m.split(".")[0] in ("torch", "deepspeed")
                   for m in imported_modules(PKG / "config.py"))
