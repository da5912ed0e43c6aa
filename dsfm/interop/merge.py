"""`dsfm merge`: fold a LoRA run's adapters into its base weights, as a plain checkpoint.

The merged checkpoint has the base model's tensor names and a config with `lora.rank: 0`,
so export, eval, generate and `train.init_from` read it as any other model.
"""

from __future__ import annotations

from pathlib import Path

from dsfm.atomic import refuse_existing
from dsfm.interop.weights import load_weights, save_plain
from dsfm.progress import Tracker
from dsfm.train import checkpoint


def merge(checkpoint_path: str | Path, out_dir: str | Path) -> Path:
    """Write the merged plain checkpoint of `checkpoint_path` (a run, checkpoints dir or tag)."""
    refuse_existing(Path(out_dir))  # before the (possibly long) weight consolidation
    ckpt_dir, tag = checkpoint.resolve(checkpoint_path)
    state = checkpoint.client_state(ckpt_dir, tag)
    with Tracker() as progress:
        with progress.phase(f"reading {ckpt_dir / tag} (LoRA folded in)"):
            weights = load_weights(ckpt_dir, tag, state)  # reads the run's lora section
        config = state["config"]
        config["lora"] = {**config["lora"], "rank": 0}
        plain = {"config": config, "step": state["step"], "merged_from": str(ckpt_dir / tag)}
        with progress.phase(f"writing {out_dir}"):
            return save_plain(out_dir, weights, plain, ckpt_dir / tag)


def merge_command(checkpoint_path: str, out: str, trust_checkpoint: bool = False) -> int:
    checkpoint.trust_pickles(trust_checkpoint)
    path = merge(checkpoint_path, out)
    print(f"wrote {path} (plain checkpoint, LoRA merged) from {checkpoint_path}")
    return 0
