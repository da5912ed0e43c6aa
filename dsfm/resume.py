"""Is a checkpoint resumable with this config? Checked from the client state alone, before
any engine is built, so a mismatch costs nothing and destroys nothing.

Three things must match: the model shape (the weights would not load, so there is no
override), and the tokenizer and dataset (they would load and silently train on different
token ids or data; `checkpoint.allow_data_change=true` accepts that on purpose, e.g. for
continued pretraining on a new corpus). The dataset is identified by its `meta.json` token
counts and source checksums, the tokenizer by a hash of `tokenizer.json`: cheap, and
independent of where the files live. Checkpoints written before fingerprints existed skip
the data check.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from dsfm.config import Config, ConfigError

MODEL_FIELDS_THAT_MUST_MATCH = (
    "vocab_size",
    "n_layers",
    "d_model",
    "n_heads",
    "n_kv_heads",
    "ffn_hidden",
    "tie_embeddings",
)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def data_fingerprint(sources: list[tuple[str, str, float]]) -> dict[str, str]:
    """Short hashes of the tokenizer file and of every dataset's counts and sources (and
    the blend weights); `sources` is `DataConfig.sources()`. All sources share one
    tokenizer (the config check makes sure), so the first one's stands for all."""
    identities = []
    for name, data_path, weight in sources:
        meta = json.loads((Path(data_path) / "meta.json").read_text())
        identity = {k: meta.get(k) for k in ("splits", "sources", "vocab_size")}
        identities.append(identity if len(sources) == 1 else [name, weight, identity])
    first = Path(sources[0][1])
    return {
        "tokenizer": _sha((first / "tokenizer.json").read_bytes()),
        "dataset": _sha(
            json.dumps(identities[0] if len(sources) == 1 else identities, sort_keys=True).encode()
        ),
    }


def check_resume_compatible(
    saved: dict[str, Any], cfg: Config, where: Path, data: dict[str, str] | None = None
) -> None:
    """One ConfigError naming every differing field; `saved` is the tag's client state."""
    saved_cfg = saved["config"]
    model_diffs = [
        f"model.{k}: checkpoint {saved_cfg['model'].get(k)!r} vs config {getattr(cfg.model, k)!r}"
        for k in MODEL_FIELDS_THAT_MUST_MATCH
        if saved_cfg["model"].get(k) != getattr(cfg.model, k)
    ]
    saved_rank = saved_cfg.get("lora", {}).get("rank", 0)
    if saved_rank != cfg.lora.rank:
        model_diffs.append(f"lora.rank: checkpoint {saved_rank} vs config {cfg.lora.rank}")
    data_diffs = []
    saved_data = saved.get("data_fingerprint")
    if saved_data and data and not cfg.checkpoint.allow_data_change:
        data_diffs = [
            f"{k}: checkpoint {saved_data.get(k)} vs data.path={cfg.data.path} {data[k]} "
            f"(checkpoint trained on {saved_cfg['data'].get('path')})"
            for k in ("tokenizer", "dataset")
            if saved_data.get(k) != data[k]
        ]
    if model_diffs:
        raise ConfigError(
            [
                f"{where} holds a different model than the config asks for; use a new "
                "train.out_dir or restore the settings:",
                *model_diffs,
                *data_diffs,
            ]
        )
    if data_diffs:
        raise ConfigError(
            [
                f"{where} was trained with a different tokenizer or dataset; point data.path "
                "back at it, use a new train.out_dir, or pass checkpoint.allow_data_change=true "
                "to continue on the new data on purpose:",
                *data_diffs,
            ]
        )
