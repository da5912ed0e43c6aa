"""Checkpoint tags on disk: the one module that names their files, and the resume checks.

    RUN/checkpoints/
      latest               the newest resumable tag's name
      step_00001000/       a tag: the engine's files (DeepSpeed's model and ZeRO optimizer
                           shards, LR scheduler), and ours:
        dsfm_state.json      client state: step, consumed samples, counters, resolved configs
        rng_rank{R}.pt       each rank's RNG states
        tokenizer.json       the tokenizer, so a tag describes itself
        manifest.json        every file of the tag and its size, written last
      best/  final/        extra tags: lowest val loss, end of training
      epoch_3/             checkpoint.every_epoch: after the update completing pass 3 (kept,
                           like best and final: `prune` removes step tags only)
    A plain checkpoint (`dsfm merge`, `dsfm import`; `dsfm.interop.weights`) is one tag
    directory whose weights are `model.safetensors` instead of the engine's files.

Design choices:
- The client state is small JSON, readable without loading any weights, so a resume is
  checked against the config (`check_resume_compatible`) before an engine is built.
- Atomic publishing: a tag is written under `.partial-<tag>`; once every rank has finished,
  rank 0 writes the manifest, renames the directory to `<tag>` (an older tag of that name
  moves to `.old-<tag>` until then) and only then replaces `latest` (temp file +
  os.replace). A kill at any point leaves the old state or the new one; `clean_stale`
  removes the leftovers at the next start.
- A tag is complete when its manifest matches the files on disk (sizes: a stat per file,
  cheap for any model size; same-size damage is not detected) and its client state parses.
  Resume and `resolve` take `latest`'s tag when complete, else the newest complete step
  tag, with a warning for each one skipped; `locate` finds train.resume_from's tag.
- No torch here: `dsfm runs`, the config's resolve step and `dsfm plan` read tags too. The
  engine's side (saving, loading, re-sharding) is `checkpointer.py`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from dsfm.config.load import to_dict
from dsfm.config.schema import Config, ConfigError
from dsfm.distributed.env import print0
from dsfm.observe.rundir import checkpoints_dir

STEP_TAG = re.compile(r"^step_(\d+)$")
EPOCH_TAG = re.compile(r"^epoch_(\d+)$")
NAMED_TAGS = ("best", "final")
STATE_FILE = "dsfm_state.json"
MANIFEST = "manifest.json"
LATEST = "latest"
PARTIAL = ".partial-"  # a tag being written
OLD = ".old-"  # a replaced tag (best, final) until its successor is in place
UNIVERSAL = "universal-"  # a tag converted for loading on another number of ranks
CONVERTER_LATEST = "latest_universal"  # DeepSpeed's converter writes it beside the tags
LATEST_TMP = ".latest.tmp-"
# What a killed save or re-shard can leave behind.
STALE_PREFIXES = (PARTIAL, OLD, UNIVERSAL, LATEST_TMP, CONVERTER_LATEST)

MODEL_FIELDS_THAT_MUST_MATCH = (
    "vocab_size",
    "n_layers",
    "d_model",
    "n_heads",
    "n_kv_heads",
    "ffn_hidden",
    "tie_embeddings",
    "family",  # qwen2 has bias tensors the others lack
)


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def epoch_tag(epoch: int) -> str:
    return f"epoch_{epoch}"


def tag_name(text: str) -> str | None:
    """A tag's name as written (`step_8` for `step_00000008`), or None if `text` names no tag."""
    if text in (*NAMED_TAGS, LATEST):
        return text
    if m := STEP_TAG.match(text):
        return step_tag(int(m.group(1)))
    if m := EPOCH_TAG.match(text):
        return epoch_tag(int(m.group(1)))
    return None


def rng_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"rng_rank{rank}.pt"


def partial_name(tag: str) -> str:
    return PARTIAL + tag


def universal_name(tag: str) -> str:
    return UNIVERSAL + tag


class CheckpointError(RuntimeError):
    """A save failed on some rank; the previous checkpoint is untouched. `agreed`: every rank
    holds this same message (rank 0 prints it), else each rank that raised prints its own."""

    def __init__(self, message: str, agreed: bool = False):
        super().__init__(message)
        self.agreed = agreed


# ---------------------------------------------------------------------------------------
# Writing


def write_client_state(tag_dir: Path, state: dict[str, Any]) -> None:
    (tag_dir / STATE_FILE).write_text(json.dumps(state, indent=1))


def write_manifest(tag_dir: Path) -> None:
    """Every file under the tag and its size; written last, after the files are complete."""
    files = {
        p.relative_to(tag_dir).as_posix(): p.stat().st_size
        for p in sorted(tag_dir.rglob("*"))
        if p.is_file() and p != tag_dir / MANIFEST
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
    tmp = ckpt_dir / f"{LATEST_TMP}{os.getpid()}"
    tmp.write_text(tag)
    os.replace(tmp, ckpt_dir / LATEST)


def clean_stale(ckpt_dir: Path) -> list[str]:
    """Remove what a killed save left behind; put back a replaced tag whose successor never
    arrived. Rank 0, before anything reads the directory."""
    if not ckpt_dir.is_dir():
        return []
    removed = []
    for p in sorted(ckpt_dir.iterdir()):
        if p.name.startswith(OLD) and not (ckpt_dir / p.name[len(OLD) :]).exists():
            os.rename(p, ckpt_dir / p.name[len(OLD) :])
        elif p.name.startswith(STALE_PREFIXES):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            removed.append(p.name)
    return removed


def prune(ckpt_dir: Path, keep_last: int) -> list[str]:
    """Delete all but the newest `keep_last` step tags; never `latest`'s target, the newest
    complete tag, best or final (they are not step tags)."""
    protected = {latest_tag(ckpt_dir), resumable_tag(ckpt_dir, warn=False)}
    steps = step_tags(ckpt_dir)
    doomed = [name for _, name in steps[:-keep_last] if name not in protected]
    for name in doomed:
        shutil.rmtree(ckpt_dir / name, ignore_errors=True)
    return doomed


# ---------------------------------------------------------------------------------------
# Reading


def latest_tag(ckpt_dir: Path) -> str | None:
    f = ckpt_dir / LATEST
    return f.read_text().strip() if f.is_file() else None


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
        return f"{MANIFEST} is missing (the save did not finish)"
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


def published_tags(ckpt_dir: Path) -> list[str]:
    """Every published tag (step tags, best, final), not leftovers of a killed save."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(t.name for t in ckpt_dir.iterdir() if t.is_dir() and not t.name.startswith("."))


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
            print0(f"warning: skipping checkpoint {ckpt_dir / name}: {reason}")
    return None


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
    if checkpoints_dir(p).is_dir():
        p = checkpoints_dir(p)
    tag = resumable_tag(p)
    if tag is None:
        raise FileNotFoundError(
            f"no complete checkpoint under {p} (no `{LATEST}` file pointing "
            "at a saved tag, and no complete step tag); has the run saved one yet?"
        )
    return p, tag


def locate(run_dir: str | Path, name: str) -> tuple[Path, str]:
    """train.resume_from as (checkpoints dir, tag): a tag's name in `run_dir` (best, final,
    latest, step_N, epoch_N) or a path (a tag directory; a run or checkpoints directory
    gives its newest complete tag). FileNotFoundError names the tags there are."""
    tag = tag_name(name)
    if tag is None:
        return resolve(name)
    here = checkpoints_dir(run_dir)
    if tag == LATEST:
        tag = resumable_tag(here, warn=False) or tag
    reason = incomplete_reason(here, tag)
    if reason is not None:
        have = published_tags(here)
        raise FileNotFoundError(
            f"{name}: no complete tag {tag} in {here} ({reason}); "
            + (f"its tags: {', '.join(have)}" if have else "it holds no checkpoint")
            + " (or pass the path of a tag directory)"
        )
    return here, tag


# ---------------------------------------------------------------------------------------
# Resume checks


def check_resume_compatible(
    saved: dict[str, Any], cfg: Config, where: Path, data: dict[str, str]
) -> None:
    """One ConfigError naming every field that differs between a tag's client state and the
    config: the model shape (the weights would not load, so there is no override), and the
    tokenizer and dataset (they would load and silently train on other token ids or data;
    `checkpoint.allow_data_change=true` accepts that on purpose). `data` is this config's
    `dsfm.data.format.fingerprint`."""
    saved_cfg = saved["config"]
    # A field newer than the checkpoint has its default there: what that model computed.
    saved_model = {**to_dict(Config())["model"], **saved_cfg["model"]}
    model_diffs = [
        f"model.{k}: checkpoint {saved_model[k]!r} vs config {getattr(cfg.model, k)!r}"
        for k in MODEL_FIELDS_THAT_MUST_MATCH
        if saved_model[k] != getattr(cfg.model, k)
    ]
    saved_rank = saved_cfg["lora"]["rank"]
    if saved_rank != cfg.lora.rank:
        model_diffs.append(f"lora.rank: checkpoint {saved_rank} vs config {cfg.lora.rank}")
    data_diffs = []
    if not cfg.checkpoint.allow_data_change:
        saved_data = saved["data_fingerprint"]
        data_diffs = [
            f"{k}: checkpoint {saved_data[k]} vs data.path={cfg.data.path} {data[k]} "
            f"(checkpoint trained on {saved_cfg['data']['path']})"
            for k in ("tokenizer", "dataset")
            if saved_data[k] != data[k]
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
