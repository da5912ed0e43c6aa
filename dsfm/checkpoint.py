"""Checkpoints: DeepSpeed-sharded engine state plus our client state, one tag per directory.

Layout: `<run>/checkpoints/<tag>/` written by `engine.save_checkpoint` (model and ZeRO
optimizer shards, LR scheduler), with `latest` naming the newest resumable tag. Step
tags are `step_00001000`; `best` (lowest val loss) and `final` are extra tags. The
client state (step, consumed samples, tokens, best val loss, resolved configs) is a small
`dsfm_state.json` in the tag, readable without loading any weights, so a resume can be
checked against the config before an engine is built. Each rank also writes its own RNG
state. The tokenizer is copied into every tag so a checkpoint is self-describing.

Atomicity: a tag is written under `.partial-<tag>`; when every rank has finished (agreed
through one all-reduce, so a failure on any rank is known to all) rank 0 writes
`manifest.json` (every file and its size), renames the directory to `<tag>` and only then
replaces `latest` (temp file + os.replace). A kill at any point leaves either the old state
or the new one; `.partial-*` leftovers are removed on the next start. A tag is complete when
its manifest matches the files on disk (sizes: a stat per file, cheap for any model size;
same-size corruption is not detected) and its client state parses; tags from before
manifests count as complete when their client state parses. Resume and `resolve` take
`latest`'s tag when complete, else the newest complete step tag, with a warning.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsfm import dist, faults

STEP_TAG = re.compile(r"^step_(\d+)$")
STATE_FILE = "dsfm_state.json"
MANIFEST = "manifest.json"
PARTIAL = ".partial-"  # a tag being written
OLD = ".old-"  # a replaced tag (best, final) until its successor is in place
PLAIN_WEIGHTS = "model.safetensors"


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (one tiny all-reduce)."""
    device = (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    )
    x = torch.tensor([float(flag)], device=device)  # NCCL needs a GPU tensor, gloo a CPU one
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(x)
    return x.item() > 0


class CheckpointError(RuntimeError):
    """A save failed on some rank; the previous checkpoint is untouched."""


def save(
    engine: Any,
    ckpt_dir: Path,
    tag: str,
    client_state: dict[str, Any],
    *,
    tokenizer_path: Path | None = None,
    update_latest: bool = True,
) -> None:
    """Every rank calls this (ZeRO shards are written by their owners); see the module doc."""
    step, rank = client_state.get("step", 0), dist.rank()
    partial = PARTIAL + tag
    tmp_dir = ckpt_dir / partial
    if dist.is_rank0():
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir(parents=True)
    barrier()
    error: OSError | None = None
    try:
        if dist.is_rank0():
            (tmp_dir / STATE_FILE).write_text(json.dumps(client_state, indent=1))
            if tokenizer_path is not None:
                shutil.copyfile(tokenizer_path, tmp_dir / "tokenizer.json")
        engine.save_checkpoint(str(ckpt_dir), tag=partial, save_latest=False)
        faults.maybe_enospc(step, rank)
        torch.save(rng_state(), tmp_dir / f"rng_rank{rank}.pt")
    except OSError as e:  # disk full, quota, I/O error: ours to report, not to hide
        error = e
    failed = any_rank(error is not None)
    if failed:
        if dist.is_rank0():
            shutil.rmtree(tmp_dir, ignore_errors=True)
        previous = latest_tag(ckpt_dir)
        reason = f"{error}" if error is not None else "another rank failed to write its files"
        raise CheckpointError(
            f"saving checkpoint {ckpt_dir / tag} failed on rank {rank}: {reason}. "
            f"Nothing was published; the previous checkpoint ({previous or 'none'}) is intact. "
            "Free disk space (or point train.out_dir elsewhere) and run again to resume."
        )
    faults.maybe_kill(step, rank, "save_shards")
    if dist.is_rank0():
        write_manifest(tmp_dir)
        publish(ckpt_dir, partial, tag)
        faults.maybe_kill(step, rank, "save_publish")
        if update_latest:
            write_latest(ckpt_dir, tag)
    barrier()
    faults.maybe_kill(step, rank, "save_done")


def write_manifest(tag_dir: Path) -> None:
    files = {
        p.relative_to(tag_dir).as_posix(): p.stat().st_size
        for p in sorted(tag_dir.rglob("*"))
        if p.is_file()
    }
    (tag_dir / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def publish(ckpt_dir: Path, partial: str, tag: str) -> None:
    """Rename a finished `.partial-<tag>` to `<tag>`, replacing an older one of that name."""
    final, old = ckpt_dir / tag, ckpt_dir / (OLD + tag)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(ckpt_dir / partial, final)
    shutil.rmtree(old, ignore_errors=True)


def write_latest(ckpt_dir: Path, tag: str) -> None:
    tmp = ckpt_dir / f".latest.tmp-{os.getpid()}"
    tmp.write_text(tag)
    os.replace(tmp, ckpt_dir / "latest")


def clean_stale(ckpt_dir: Path) -> list[str]:
    """Remove what a killed save left behind; put back a replaced tag whose successor never
    arrived. Rank 0, before anything reads the directory."""
    if not ckpt_dir.is_dir():
        return []
    removed = []
    for p in sorted(ckpt_dir.iterdir()):
        if p.name.startswith(OLD) and not (ckpt_dir / p.name[len(OLD) :]).exists():
            os.rename(p, ckpt_dir / p.name[len(OLD) :])
        elif p.name.startswith((PARTIAL, OLD, ".latest.tmp-", "universal-", "latest_univ")):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            removed.append(p.name)
    return removed


def load(engine: Any, ckpt_dir: Path, tag: str | None = None) -> dict[str, Any] | None:
    """Load `tag` (default: the newest complete one) into the engine; return its client state."""
    tag = tag or resumable_tag(ckpt_dir)
    if tag is None:
        return None
    state = client_state(ckpt_dir, tag)
    if saved_world_size(state) != dist.world_size() and engine.zero_optimization_stage() > 0:
        load_resharded(engine, ckpt_dir, tag, state)
    else:
        path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    rng_file = ckpt_dir / tag / f"rng_rank{dist.rank()}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than saved
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def saved_world_size(state: dict[str, Any]) -> int:
    """Ranks that wrote a tag (older tags: derived from the saved DeepSpeed batch sizes)."""
    if "world_size" in state:
        return state["world_size"]
    ds = state["ds_config"]
    per_rank = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"]
    return ds["train_batch_size"] // per_rank


def load_resharded(engine: Any, ckpt_dir: Path, tag: str, state: dict[str, Any]) -> None:
    """Load ZeRO shards written by a different number of ranks.

    ZeRO-1/2/3 cut the optimizer state (and ZeRO-3 the weights) into one flat piece per rank,
    so the pieces of W ranks do not fit W' ranks. Rank 0 converts the tag to DeepSpeed's
    universal format (per-parameter files), every rank loads its new piece from that, and the
    conversion is deleted: the tag itself is never modified. ZeRO-0 state is not sharded.
    """
    universal = "universal-" + tag
    dist.print0(
        f"checkpoint {tag} was written by {saved_world_size(state)} rank(s), this run has "
        f"{dist.world_size()}: re-sharding through DeepSpeed's universal checkpoint format"
    )
    if dist.is_rank0():
        from dsfm.engine import to_universal

        partial = ckpt_dir / (PARTIAL + universal)
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(ckpt_dir / universal, ignore_errors=True)
        to_universal(ckpt_dir / tag, partial)
        os.rename(partial, ckpt_dir / universal)
        (ckpt_dir / "latest_universal").unlink(missing_ok=True)  # the converter's; not ours
    barrier()
    from dsfm.engine import load_universal

    load_universal(engine, ckpt_dir, universal)
    barrier()
    if dist.is_rank0():
        shutil.rmtree(ckpt_dir / universal, ignore_errors=True)


def latest_tag(ckpt_dir: Path) -> str | None:
    f = ckpt_dir / "latest"
    return f.read_text().strip() if f.is_file() else None


def incomplete_reason(ckpt_dir: Path, tag: str) -> str | None:
    """Why `tag` cannot be resumed from, or None when it is complete."""
    tag_dir = ckpt_dir / tag
    if not tag_dir.is_dir():
        return "missing"
    try:
        client_state(ckpt_dir, tag)
    except (FileNotFoundError, ValueError) as e:
        return str(e)
    manifest = tag_dir / MANIFEST
    if not manifest.is_file():
        return None  # written before manifests existed
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"{manifest} is corrupt ({e})"
    for name, size in files.items():
        f = tag_dir / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
    return None


def step_tags(ckpt_dir: Path) -> list[tuple[int, str]]:
    """Published step tags, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(
        (int(m.group(1)), p.name)
        for p in ckpt_dir.iterdir()
        if p.is_dir() and (m := STEP_TAG.match(p.name))
    )


def resumable_tag(ckpt_dir: Path, before_step: int | None = None, warn: bool = True) -> str | None:
    """`latest`'s tag if complete, else the newest complete step tag (warning about each one
    skipped). With `before_step`, only step tags older than that step (a rollback)."""
    candidates = [name for _, name in reversed(step_tags(ckpt_dir))]
    if before_step is not None:
        candidates = [n for n in candidates if int(STEP_TAG.match(n).group(1)) < before_step]
    else:
        latest = latest_tag(ckpt_dir)
        if latest:
            candidates = [latest] + [n for n in candidates if n != latest]
    for name in candidates:
        reason = incomplete_reason(ckpt_dir, name)
        if reason is None:
            return name
        if warn:
            dist.print0(f"warning: skipping checkpoint {ckpt_dir / name}: {reason}")
    return None


def prune(ckpt_dir: Path, keep_last: int) -> list[str]:
    """Delete all but the newest `keep_last` step tags; never `latest`'s target, the newest
    complete tag, best or final (they are not step tags)."""
    protected = {latest_tag(ckpt_dir), resumable_tag(ckpt_dir, warn=False)}
    steps = step_tags(ckpt_dir)
    doomed = [name for _, name in steps[:-keep_last] if name not in protected]
    for name in doomed:
        shutil.rmtree(ckpt_dir / name, ignore_errors=True)
    return doomed


def resolve(path: str | Path) -> tuple[Path, str]:
    """A run dir, a checkpoints dir or a tag dir -> (checkpoints dir, tag)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"{p} does not exist (pass a run directory, its checkpoints/ "
            "directory, or one checkpoint tag directory)"
        )
    if (p / STATE_FILE).is_file():
        return p.parent, p.name
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    tag = resumable_tag(p)
    if tag is None:
        raise FileNotFoundError(
            f"no complete checkpoint under {p} (no `latest` file pointing "
            "at a saved tag, and no complete step tag); has the run saved one yet?"
        )
    return p, tag


def client_state(ckpt_dir: Path, tag: str) -> dict[str, Any]:
    """The client state of a tag, read without loading any weights."""
    f = ckpt_dir / tag / STATE_FILE
    if not f.is_file():
        raise FileNotFoundError(
            f"{ckpt_dir / tag} has no {STATE_FILE}: not a complete dsfm "
            "checkpoint (interrupted save, or written by another tool)"
        )
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is corrupt ({e}); resume from an earlier tag") from None


def save_plain(
    out_dir: str | Path,
    weights: dict[str, torch.Tensor],
    state: dict[str, Any],
    tokenizer_path: str | Path,
) -> Path:
    """A plain checkpoint: `model.safetensors` + `dsfm_state.json` + `tokenizer.json`.

    What merge and import write, and a starting point for fine-tuning or continued
    pretraining. `state` must hold the resolved "config". Written to a temp dir and renamed,
    so a failure leaves nothing; an existing directory is refused.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new output directory")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        # clone: safetensors refuses tensors sharing storage (tied embeddings)
        tensors = {k: v.detach().cpu().clone() for k, v in weights.items()}
        save_file(tensors, str(tmp / PLAIN_WEIGHTS))
        os.chmod(tmp / PLAIN_WEIGHTS, 0o644)  # safetensors writes 0600; match the other files
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_weights(ckpt_dir: Path, tag: str, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a DeepSpeed tag (any ZeRO stage) or a plain checkpoint."""
    plain = ckpt_dir / tag / PLAIN_WEIGHTS
    if plain.is_file():
        from safetensors.torch import load_file

        weights = {k: v.float() for k, v in load_file(str(plain)).items()}
    else:
        from dsfm.engine import consolidated_state_dict, zero_stage

        weights = consolidated_state_dict(ckpt_dir, tag, zero_stage(state["ds_config"]))
    lora = state["config"].get("lora", {})
    if lora.get("rank", 0) > 0:  # adapters folded in: callers always see plain Llama weights
        from dsfm.lora import merge_state_dict

        weights = merge_state_dict(weights, lora["alpha"] / lora["rank"])
    return weights


def load_into(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: Path) -> None:
    """Strict load that tolerates a tied LM head being absent; clear error otherwise."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = getattr(model, "cfg", None) is not None and model.cfg.tie_embeddings
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(
            f"weights in {where} do not fit the model (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]})"
        )


def load_model(path: str | Path, dtype: str = "fp32") -> tuple[Any, Any]:
    """(GPT in eval mode, Tokenizer) from any ZeRO stage's checkpoint or a plain one."""
    from dsfm.config import from_dict
    from dsfm.model.gpt import GPT
    from dsfm.tokenizer import Tokenizer

    ckpt_dir, tag = resolve(path)
    state = client_state(ckpt_dir, tag)
    cfg = from_dict(state["config"])
    model = GPT(cfg.model)
    load_into(model, load_weights(ckpt_dir, tag, state), ckpt_dir / tag)
    model.to(torch.bfloat16 if dtype == "bf16" else torch.float32).eval()
    return model, Tokenizer.load(ckpt_dir / tag)
