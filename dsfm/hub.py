"""Where a model or tokenizer named by the user lies on disk: a local directory or file, or a
Hugging Face hub id (`org/name`) resolved through the local hub cache.

Hub ids are looked up in the cache first, so a cached model works offline. Only when it is
not cached (and `HF_HUB_OFFLINE` is not set) is a download tried; when that fails too, the
error names the id, the cache searched and how to fill it. torch-free: the CLI and the data
pipeline call it.
"""

from __future__ import annotations

import os
from pathlib import Path

# What dsfm reads from a hub snapshot: configs, tokenizers, weights (never pickles).
PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


class NotFound(ValueError):
    """A name that is neither a local path nor a hub id we could get."""


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def local_path(name: str, patterns: list[str] | None = None) -> Path:
    """`name` as a local path: itself when it exists, else the cached (or, when online,
    downloaded) snapshot directory of the hub id `name`."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    if not looks_like_hub_id(name):
        raise NotFound(f"{name}: no such file or directory (nor a hub id like org/name)")
    from huggingface_hub import snapshot_download

    patterns = patterns or PATTERNS
    try:
        return Path(snapshot_download(name, allow_patterns=patterns, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError and friends)
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if not offline:
        try:
            return Path(snapshot_download(name, allow_patterns=patterns))
        except Exception as err:  # no network, no such repo, gated repo...
            why = f"download failed ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
    else:
        why = "HF_HUB_OFFLINE is set"
    raise NotFound(
        f"{name}: not a local path and not in the Hugging Face cache {cache_dir()} ({why}); "
        f"download it where there is network (`huggingface-cli download {name}`) and copy the "
        "cache, or pass the model's local directory"
    )
