"""Saving and loading the whole training state through the DeepSpeed engine, and when to save.

The tag layout and its publishing protocol are `checkpoint.py`'s; this module drives them
with the engine on every rank: ZeRO shards are written by their owners, so every rank
calls `save` and `load`, and the collectives that make a save atomic live here.

Design choices:
- A failed save on any rank (disk full at any layer, a read-only or forbidden directory, a
  rank dying) never leaves a rank waiting: every phase of a save ends in an all-gather of
  each rank's outcome, DeepSpeed's writes report their errors instead of raising them
  between DeepSpeed's barriers (`engine.save_checkpoint`), and a rank that lost contact
  leaves. Every rank raises a `CheckpointError` naming the intact checkpoint (exit status
  1, one message), and nothing is published.
- The whole training state is the engine's (weights, ZeRO optimizer shards, LR schedule),
  each rank's RNG states, and the trainer's client state (`dsfm_state.json`): loading
  them all is an exact resume.
- A tag written by a different number of ranks is re-sharded through DeepSpeed's universal
  format (ZeRO-1/2/3); the tag itself is never modified.
- `due(step)` decides when a step tag is saved, so the training loop only asks.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsfm.config.schema import CheckpointConfig
from dsfm.data.tokenizer import copy_tokenizer
from dsfm.distributed.collectives import barrier, gather
from dsfm.distributed.env import is_rank0, print0, rank, world_size
from dsfm.testing import faults
from dsfm.train import checkpoint
from dsfm.train import engine as ds_engine
from dsfm.train.checkpoint import CheckpointError


class Checkpointer:
    """Every rank's handle on `ckpt_dir` for one engine."""

    def __init__(self, engine: Any, ckpt_dir: Path, cfg: CheckpointConfig, tokenizer: Path):
        self.engine, self.ckpt_dir, self.cfg, self.tokenizer = engine, ckpt_dir, cfg, tokenizer

    def due(self, step: int, end: int) -> bool:
        """Whether step `step` saves a step tag: every `checkpoint.every` steps and at the end
        of this invocation (`end`: train.stop_at or max_steps; max_steps itself saves `final`)."""
        return step == end or bool(self.cfg.every and step % self.cfg.every == 0)

    def epoch_due(self, passes_before: int, passes_after: int) -> bool:
        """Whether the last step completed a pass over the training data, to be saved as
        `epoch_N` (checkpoint.every_epoch). Epoch tags are not pruned by keep_last."""
        return self.cfg.every_epoch and passes_after > passes_before

    def save(self, tag: str, state: dict[str, Any], update_latest: bool = True) -> None:
        """Write and publish `tag` on every rank, then keep the newest `keep_last` step tags."""
        self._write(tag, state, update_latest)
        if is_rank0():
            checkpoint.prune(self.ckpt_dir, self.cfg.keep_last)
        self._agree(tag, None)

    def _write(self, tag: str, state: dict[str, Any], update_latest: bool) -> None:
        """Three phases, each ending in an agreement of all ranks on its outcome (`_agree`):
        rank 0 makes `.partial-<tag>`, every rank writes its files into it, rank 0
        publishes. A failure anywhere removes the partial tag and raises the same
        CheckpointError on every rank."""
        step, this_rank = state["step"], rank()
        partial = checkpoint.partial_name(tag)
        tmp_dir = self.ckpt_dir / partial

        def start() -> None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            tmp_dir.mkdir(parents=True)

        self._agree(tag, _attempt(start) if is_rank0() else None)
        try:
            error = ds_engine.save_checkpoint(self.engine, self.ckpt_dir, partial)
        except (OSError, RuntimeError) as e:
            # Raised between DeepSpeed's own collectives: where the other ranks wait is
            # unknown, so this rank leaves without another collective; its exit makes
            # theirs fail, and they report the lost rank (`_agree`).
            raise self._failure(tag, f"rank {this_rank}: {_one_line(e)}", agreed=False) from None
        if error is None:
            error = _attempt(lambda: self._write_own(tmp_dir, state))
        faults.maybe_kill(step, this_rank, "save_shards")
        self._agree(tag, error)
        # Each rank hashes its share of the tag's files for the manifest, once all are written.
        share = _attempt(lambda: checkpoint.write_hash_share(tmp_dir, this_rank, world_size()))
        self._agree(tag, share)
        if is_rank0():
            self._agree(tag, _attempt(lambda: self._publish(tmp_dir, tag, step, update_latest)))
        else:
            self._agree(tag, None)
        faults.maybe_kill(step, this_rank, "save_done")

    def _write_own(self, tmp_dir: Path, state: dict[str, Any]) -> None:
        """Our files beside the engine's: client state and tokenizer (rank 0), RNG (each)."""
        if is_rank0():
            checkpoint.write_client_state(tmp_dir, state)
            copy_tokenizer(self.tokenizer, tmp_dir)
        torch.save(rng_state(), checkpoint.rng_file(tmp_dir, rank()))

    def _publish(self, tmp_dir: Path, tag: str, step: int, update_latest: bool) -> None:
        checkpoint.write_manifest(tmp_dir)
        checkpoint.publish(self.ckpt_dir, tmp_dir.name, tag)
        faults.maybe_kill(step, 0, "save_publish")
        if update_latest:
            checkpoint.write_latest(self.ckpt_dir, tag)

    def _agree(self, tag: str, error: Exception | None) -> None:
        """Every rank learns every rank's outcome of a save phase (one small all-gather);
        on any failure rank 0 removes the partial tag and every rank raises the same
        CheckpointError. A collective that fails here means a rank died or left."""
        mine = None if error is None else f"rank {rank()}: {_one_line(error)}"
        try:
            reasons = [r for r in gather(mine) if r is not None]
        except RuntimeError as e:  # gloo: the peer's connection closed
            reason = f"rank {rank()} lost contact with another rank (it died or failed): "
            raise self._failure(tag, reason + _one_line(e), agreed=False) from None
        if not reasons:
            return
        error = self._failure(tag, "; ".join(reasons), agreed=True)
        with contextlib.suppress(RuntimeError):  # the partial tag is gone before anyone
            barrier()  # reads the directory (a rank leaving just now fails this: no matter)
        raise error

    def _failure(self, tag: str, reason: str, agreed: bool) -> CheckpointError:
        """The error every failed save raises; rank 0 removes the partial tag first (never
        published content: publishing renames it away)."""
        if is_rank0():
            shutil.rmtree(self.ckpt_dir / checkpoint.partial_name(tag), ignore_errors=True)
        intact = checkpoint.resumable_tag(self.ckpt_dir, warn=False)
        try:
            free = f"{shutil.disk_usage(self.ckpt_dir).free / 2**20:.1f} MiB free there"
        except OSError:
            free = "its free space unknown"
        return CheckpointError(
            f"saving checkpoint {tag} in {self.ckpt_dir} failed ({reason}; {free}). "
            + "Nothing half-written was published; the intact checkpoint is "
            + (f"{intact} (a restart resumes from it)" if intact else "none: no checkpoint yet")
            + ". Free disk space, make the directory writable, or point train.out_dir "
            "elsewhere, then run again.",
            agreed=agreed,
        )

    def load(self, tag: str, ckpt_dir: Path | None = None) -> dict[str, Any]:
        """Load `tag` of `ckpt_dir` (default: this run's) into the engine and this rank's
        RNG; return its client state."""
        ckpt_dir = ckpt_dir or self.ckpt_dir
        state = checkpoint.client_state(ckpt_dir, tag)
        ds_engine.check_pickles(ckpt_dir / tag)  # before DeepSpeed unpickles anything
        if state["world_size"] != world_size() and self.engine.zero_optimization_stage() > 0:
            self._load_resharded(ckpt_dir, tag, state["world_size"])
        else:
            path, _ = self.engine.load_checkpoint(str(ckpt_dir), tag=tag)
            if path is None:
                raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
        rng = checkpoint.rng_file(ckpt_dir / tag, rank())
        if rng.is_file():  # absent when resuming on more ranks than saved
            set_rng_state(ds_engine.load_pickle(rng))
        return state

    def _load_resharded(self, source: Path, tag: str, saved_world: int) -> None:
        """ZeRO-1/2/3 cut the optimizer state (and ZeRO-3 the weights) into one flat piece per
        rank, so the pieces of W ranks do not fit W' ranks. Rank 0 converts the tag to
        DeepSpeed's universal format (per-parameter files), every rank loads its new piece
        from that, and the conversion (in this run's directory) is deleted. ZeRO-0 state is
        not sharded."""
        universal = checkpoint.universal_name(tag)
        print0(
            f"checkpoint {tag} was written by {saved_world} rank(s), this run has "
            f"{world_size()}: re-sharding through DeepSpeed's universal checkpoint format"
        )
        if is_rank0():
            partial = self.ckpt_dir / checkpoint.partial_name(universal)
            shutil.rmtree(partial, ignore_errors=True)
            shutil.rmtree(self.ckpt_dir / universal, ignore_errors=True)
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            ds_engine.to_universal(source / tag, partial)
            os.rename(partial, self.ckpt_dir / universal)
            # DeepSpeed's converter leaves its own `latest` pointer; not ours to keep.
            (self.ckpt_dir / checkpoint.CONVERTER_LATEST).unlink(missing_ok=True)
        barrier()
        ds_engine.load_universal(self.engine, self.ckpt_dir, universal)
        barrier()
        if is_rank0():
            shutil.rmtree(self.ckpt_dir / universal, ignore_errors=True)


def _attempt(write: Callable[[], None]) -> Exception | None:
    """Run a save's file writes; return what failed (a full disk, a read-only or forbidden
    directory: OSError, or RuntimeError from torch's zip writer) instead of raising it."""
    try:
        write()
    except (OSError, RuntimeError) as e:
        return e
    return None


def _one_line(e: BaseException) -> str:
    """An error's text on one line: torch's C++ errors span several."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def rng_state() -> dict[str, Any]:
    """Tensors, tuples and numbers only, so torch.load(weights_only=True) reads it back."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
