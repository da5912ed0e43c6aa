"""Checkpoint tags on disk: the one module that names their files, and the resume checks.

    RUN/checkpoints/
      latest               the newest resumable tag's name
      step_00001000/       a tag: the engine's files (DeepSpeed's model and ZeRO optimizer
                           shards, LR scheduler), and ours:
        dsfm_state.json      client state: step, consumed samples, counters, resolved configs
        rng_rank{R}.pt       each rank's RNG states
        tokenizer.json       the tokenizer, so a tag describes itself
        manifest.json        every file of the tag, its size and sha256, written last
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
- A tag is complete when its manifest matches the files on disk and its client state
  parses. Sizes (a stat per file) are checked wherever tags are listed (prune, `dsfm runs`);
  contents (sha256 of every file, ~1 GB/s a core) wherever a tag is about to be loaded
  (resume, rollback, generate/eval/export/merge), since a same-size change (bit rot, a
  bad copy) otherwise loads silently as NaN weights. Digests are memoised per file
  (path, size, mtime) so one command that resolves a tag twice hashes it once.
- The digests are computed after every rank has written its files and before publish, by
  all ranks at once, each hashing a share of the files balanced by size
  (`write_hash_share`); rank 0 merges the shares into the manifest. Hashing inside the
  writes is not practical: DeepSpeed writes its files itself with torch.save. The files
  were just written, so they are read back from the page cache.
- Which tag: the newest complete tag by step (from its client state), so `final` wins over
  an older step tag; at equal steps `latest`'s tag. One line says so when that is not
  `latest`'s tag, and a warning names each newer tag skipped (and why). A tag named
  explicitly (a tag directory, train.resume_from=step_N) that is damaged is an error naming
  the damage and the intact tags. `locate` finds train.resume_from's tag.
- No torch here: `dsfm runs`, the config's resolve step and `dsfm plan` read tags too. The
  engine's side (saving, loading, re-sharding) is `checkpointer.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
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
DIGEST = "sha256"  # hashlib's; with SHA-NI ~2x blake2b's speed (docs/checkpoints.md)
HASH_SHARE = ".hashes-rank"  # one rank's digests, merged into the manifest by rank 0
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


# The user's word that this process may unpickle arbitrary objects from checkpoints
# (--trust-checkpoint; a command-line flag only, never a config key: a config can come with
# the checkpoint it would vouch for). `engine.load_pickle` reads it.
_trust = {"pickles": False}


def trust_pickles(on: bool) -> None:
    _trust["pickles"] = bool(on)


def pickles_trusted() -> bool:
    return _trust["pickles"]


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


def _tag_files(tag_dir: Path) -> list[Path]:
    """The files a manifest lists: all but the manifest and the hash shares."""
    return [
        p
        for p in sorted(tag_dir.rglob("*"))
        if p.is_file() and p != tag_dir / MANIFEST and not p.name.startswith(HASH_SHARE)
    ]


def file_digest(path: Path) -> str:
    """The file's sha256, memoised by (path, size, mtime): a second look costs a stat."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _digests:
        with open(path, "rb") as f:
            _digests[key] = hashlib.file_digest(f, DIGEST).hexdigest()
    return _digests[key]


_digests: dict[tuple[str, int, int], str] = {}


def write_hash_share(tag_dir: Path, rank: int, world: int) -> None:
    """Every rank, once all have written: hash this rank's share of the tag's files (largest
    first to the least loaded rank, the same split on every rank) into a share file."""
    files = sorted(_tag_files(tag_dir), key=lambda p: (-p.stat().st_size, p.name))
    loads, mine = [0] * world, {}
    for p in files:
        owner = loads.index(min(loads))
        loads[owner] += p.stat().st_size
        if owner == rank:
            mine[p.relative_to(tag_dir).as_posix()] = file_digest(p)
    (tag_dir / f"{HASH_SHARE}{rank}.json").write_text(json.dumps(mine))


def write_manifest(tag_dir: Path) -> None:
    """Every file under the tag, its size and digest; written last, after the files are
    complete. Digests come from the ranks' shares (`write_hash_share`); a file no share
    covers is hashed here."""
    shares: dict[str, str] = {}
    for share in sorted(tag_dir.glob(f"{HASH_SHARE}*.json")):
        shares.update(json.loads(share.read_text()))
        share.unlink()
    files = {}
    for p in _tag_files(tag_dir):
        name = p.relative_to(tag_dir).as_posix()
        files[name] = {"bytes": p.stat().st_size, DIGEST: shares.get(name) or file_digest(p)}
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
    complete tag, the newest complete step tag (a rollback's), best or final (they are not
    step tags)."""
    steps = step_tags(ckpt_dir)
    newest_step = next((n for _, n in reversed(steps) if not incomplete_reason(ckpt_dir, n)), None)
    protected = {latest_tag(ckpt_dir), newest_step, resumable_tag(ckpt_dir, False, False, False)}
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


def incomplete_reason(ckpt_dir: Path, tag: str, content: bool = False) -> str | None:
    """Why `tag` cannot be resumed from, or None when it is complete. `content`: every
    file's digest too, not only its size (before loading: see the module doc)."""
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
    for name, entry in files.items():
        # A manifest of dsfm <= 0.x before content hashes lists sizes only: sizes are checked.
        size, digest = (entry, None) if isinstance(entry, int) else (entry["bytes"], entry[DIGEST])
        f = tag_dir / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
        if content and digest is not None and file_digest(f) != digest:
            return f"{name} is damaged: its content differs from the {DIGEST} in {MANIFEST}"
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


def tag_step(ckpt_dir: Path, tag: str) -> int | None:
    """The step a tag was saved at (its client state; a step tag's name if that is
    unreadable), or None."""
    try:
        return int(client_state(ckpt_dir, tag)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        m = STEP_TAG.match(tag)
        return int(m.group(1)) if m else None


def _newest_first(ckpt_dir: Path, latest: str | None) -> list[tuple[int, str]]:
    """(step, tag) of every published tag, newest first; at equal steps `latest`'s tag, then
    final, step, epoch and best tags."""
    kind = {"final": 3, "best": 0}
    keyed = []
    for tag in published_tags(ckpt_dir):
        step = tag_step(ckpt_dir, tag)
        if step is not None:
            order = kind.get(tag, 2 if STEP_TAG.match(tag) else 1)
            keyed.append(((step, tag == latest, order), tag))
    return [(key[0], tag) for key, tag in sorted(keyed, reverse=True)]


def resumable_tag(
    ckpt_dir: Path, before_step: int | None = None, warn: bool = True, content: bool = True
) -> str | None:
    """The newest complete tag by step (see the module doc), warning about each newer one
    skipped; with `before_step`, only step tags older than that step (a rollback).
    `content`: verify digests (before a load); sizes only otherwise."""
    latest = latest_tag(ckpt_dir)
    if before_step is not None:
        candidates = [(s, n) for s, n in reversed(step_tags(ckpt_dir)) if s < before_step]
    else:
        candidates = _newest_first(ckpt_dir, latest)
    for step, name in candidates:
        reason = incomplete_reason(ckpt_dir, name, content)
        if reason is None:
            if warn and before_step is None and name != latest:
                why = (
                    f"`{LATEST}` names {latest}"
                    if latest and (ckpt_dir / latest).is_dir()
                    else f"`{LATEST}` names no saved tag"
                    if latest
                    else f"no `{LATEST}` file"
                )
                print0(
                    f"checkpoint: using {name} (step {step}), the newest complete tag ({why})",
                    file=sys.stderr,
                )
            return name
        if warn:
            print0(f"warning: skipping checkpoint {ckpt_dir / name}: {reason}", file=sys.stderr)
    return None


def intact_tags(ckpt_dir: Path) -> list[str]:
    """The published tags whose contents match their manifests (the alternatives an error
    about a damaged tag names)."""
    return [t for t in published_tags(ckpt_dir) if incomplete_reason(ckpt_dir, t, True) is None]


def _damaged(ckpt_dir: Path, tag: str, reason: str) -> ValueError:
    have = intact_tags(ckpt_dir)
    return ValueError(
        f"checkpoint {ckpt_dir / tag} is not usable: {reason}. "
        + (f"Intact tags in {ckpt_dir}: {', '.join(have)}" if have else "No tag there is intact")
        + f" (`dsfm ckpt verify {ckpt_dir}` checks them all)"
    )


def resolve(path: str | Path) -> tuple[Path, str]:
    """A run dir, a checkpoints dir or a tag dir -> (checkpoints dir, tag)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"{p} does not exist (pass a run directory, its checkpoints/ "
            "directory, or one checkpoint tag directory)"
        )
    if (p / STATE_FILE).is_file():  # a tag named explicitly: damage is an error
        if (reason := incomplete_reason(p.parent, p.name, content=True)) is not None:
            raise _damaged(p.parent, p.name, reason)
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
        tag = resumable_tag(here) or tag
    reason = incomplete_reason(here, tag, content=True)
    if reason is not None and (here / tag / MANIFEST).is_file():
        raise _damaged(here, tag, reason)
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


# ---------------------------------------------------------------------------------------
# `dsfm ckpt verify`


def verify_command(run: str) -> int:
    """Check every tag of a run (or checkpoints directory) against its manifest, contents
    included: one line per tag, exit status 1 if any is damaged or incomplete."""
    p = Path(run)
    here = checkpoints_dir(p) if checkpoints_dir(p).is_dir() else p
    tags = published_tags(here)
    if not tags:
        raise FileNotFoundError(
            f"no checkpoint tags under {p} (pass a run directory or its checkpoints/ directory)"
        )
    bad = 0
    for tag in tags:
        reason = incomplete_reason(here, tag, content=True)
        bad += reason is not None
        print(f"{tag}: OK" if reason is None else f"{tag}: DAMAGED: {reason}")
    latest = latest_tag(here)
    chosen = resumable_tag(here, warn=False)
    print(
        f"{len(tags) - bad} of {len(tags)} tags intact; `{LATEST}`: {latest or 'none'}; "
        f"resume and load would use: {chosen or 'none'}"
    )
    return 1 if bad else 0
