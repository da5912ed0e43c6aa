"""`dsfm prepare`: text corpora (or chat records) -> a prepared dataset directory.

The pipeline: `sources.py` resolves the inputs and reads documents -> `encode.py` tokenizes
them in batches (EOT after each) -> `writers.py` assigns each document to train or val and
writes the token files -> `format.write_meta` saves the tokenizer and `meta.json`. Chat data
(`prepare_chat`) renders each conversation with `chat.py`'s template and writes its loss
mask beside the tokens.

Design choices:
- Streaming: documents are read one at a time (a long text document in parts) and
  tokenized in batches of about a MB, so memory is bounded by the batch size, not the
  corpus nor its largest text file. Token arrays (`.npy`/`.bin`, `token_arrays.py`) skip
  the tokenizer: their ids are checked and copied.
- The val split: whole documents drawn at random, topped up from the end of train when
  they cannot make up `val_fraction` of the tokens (`writers.TextSplitAssigner`), so one
  text file gets a val split too; `meta.json`'s `val_cut_tokens` says how many were cut.
- Atomic: everything is written to a temp dir beside `out_dir` (same filesystem) and
  renamed into place when complete (`dsfm.atomic`). A failure leaves nothing behind, and
  `force=True` replaces an old dataset only after the new one is complete. `force` only
  ever replaces a directory that is empty or holds a prepared dataset, so a typo cannot
  delete unrelated files.
- Options are checked before any input is read; `max_bytes` caps the `stdlib` corpus only
  (files are always read to the end so their sha256 in `meta.json` describes what was
  tokenized).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np

from dsfm.atomic import staged_dir
from dsfm.data.chat import (
    CHAT_TEMPLATE,
    Template,
    add_chat_tokens,
    assemble,
    chat_token_ids,
    encode_contents,
    end_of_turn_id,
    parse_record,
    render,
)
from dsfm.data.encode import ENCODE_BATCH_BYTES, ENCODE_BATCH_DOCS, BatchEncoder
from dsfm.data.format import (
    MASK_DTYPE,
    META_FILE,
    SPLITS,
    file_sha256,
    is_dataset_dir,
    token_dtype,
    write_meta,
)
from dsfm.data.model_template import check_template
from dsfm.data.sources import (
    JSONL_SUFFIX,
    Source,
    SourceStats,
    input_bytes,
    jsonl_records,
    read_documents,
    resolve_inputs,
)
from dsfm.data.token_arrays import RAW_DTYPES, open_token_array, token_documents
from dsfm.data.tokenizer import TOKENIZER_FILE, Tokenizer, byte_tokenizer, train_bpe
from dsfm.data.writers import (
    MaskedSplitWriter,
    ShardedSplitWriter,
    SplitAssigner,
    TextSplitAssigner,
)
from dsfm.hub import local_path, looks_like_hub_id
from dsfm.progress import Tracker

BYTE_TOKENIZER = "byte"


@dataclass(frozen=True)
class PrepareOptions:
    """How documents become a dataset (what `meta.json` records besides the counts)."""

    text_key: str = "text"
    val_fraction: float = 0.01
    seed: int = 1337
    max_bytes: int | None = None
    workers: int = 1
    max_shard_bytes: int | None = None
    doc_separator: str | None = None
    dtype: str | None = None  # of raw .bin token arrays

    def check(self) -> None:
        if not (isinstance(self.workers, int) and self.workers >= 1):
            raise ValueError(
                f"workers={self.workers!r} must be a positive integer (processes to tokenize)"
            )
        if self.max_shard_bytes is not None and not (
            isinstance(self.max_shard_bytes, int) and self.max_shard_bytes > 0
        ):
            raise ValueError(
                f"max_shard_bytes={self.max_shard_bytes!r} must be a positive number of bytes "
                f"(e.g. 1GB), or unset for one file per split"
            )
        check_val_fraction(self.val_fraction, "the tokens")
        if not self.text_key:
            raise ValueError("text_key must name the JSONL field that holds document text")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise ValueError(f"max_bytes={self.max_bytes} must be positive, or None for no cap")
        if self.doc_separator == "":
            raise ValueError("doc_separator must be a non-empty string, e.g. '<|endoftext|>'")
        if self.dtype is not None and self.dtype not in RAW_DTYPES:
            raise ValueError(f"dtype={self.dtype!r} must be one of {', '.join(RAW_DTYPES)}")


def prepare(
    inputs: list[str],
    out_dir: str | Path,
    *,
    tokenizer: str | None = None,
    vocab_size: int = 8192,
    text_key: str = "text",
    val_fraction: float = 0.01,
    seed: int = 1337,
    max_bytes: int | None = None,
    workers: int = 1,
    max_shard_bytes: int | None = None,
    doc_separator: str | None = None,
    dtype: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize `inputs` into `out_dir` (train/val .bin + .idx, tokenizer.json, meta.json).

    `tokenizer`: None trains a byte-level BPE of `vocab_size` on the documents; "byte" uses
    the 257-token byte tokenizer; anything else is a tokenizer to reuse (`resolve_tokenizer`),
    and `vocab_size` is then ignored. `workers` processes tokenize in
    parallel (output identical for any count); `max_shard_bytes` cuts each split into
    shards. `doc_separator` splits text files into documents; `dtype` is that of raw `.bin`
    token arrays (inferred when unambiguous). Returns the meta dict written to meta.json.
    """
    out_dir = Path(os.path.abspath(Path(out_dir).expanduser()))  # "." has no name to sit beside
    opts = PrepareOptions(
        text_key, val_fraction, seed, max_bytes, workers, max_shard_bytes, doc_separator, dtype
    )
    opts.check()
    if tokenizer is None and vocab_size < 257:
        raise ValueError(
            f"vocab_size={vocab_size} is too small to train a byte-level BPE (minimum 257: "
            f"256 bytes + EOT); use tokenizer='byte' for a pure byte vocabulary"
        )
    check_out_dir(out_dir, force)
    check_inputs_outside(out_dir, inputs)
    sources = resolve_inputs(inputs)
    check_inputs_outside(out_dir, [s.path for s in sources])
    if all(s.kind not in ("stdlib", "hf") and os.path.getsize(s.path) == 0 for s in sources):
        raise ValueError(f"empty corpus: every input file is empty ({[s.path for s in sources]})")
    arrays = [s.path for s in sources if s.kind == "tokens"]
    if arrays and tokenizer is None:
        raise ValueError(
            f"token arrays {arrays} need --tokenizer: the {TOKENIZER_FILE} that made their "
            f"ids (or `{BYTE_TOKENIZER}`); their ids are used as they are, not re-tokenized"
        )
    tok = resolve_tokenizer(tokenizer)
    for path in arrays:  # an unreadable or ambiguous array is refused before progress starts
        open_token_array(path, opts.dtype, tok.vocab_size)

    with staged_dir(out_dir, replace=force) as tmp_dir, Tracker(enabled=progress) as bar:
        if tok is None:
            tok = _train_tokenizer(sources, opts, vocab_size, bar)
        splits, source_records, cut = _write_splits(tmp_dir, sources, tok, opts, bar)
        meta = write_meta(
            tmp_dir,
            tok,
            splits,
            source_records,
            text_key=text_key,
            val_fraction=val_fraction,
            seed=seed,
            empty_docs=sum(r["empty_docs"] for r in source_records),
            chars=sum(r["chars"] for r in source_records),
            val_cut_tokens=cut,
            doc_separator=doc_separator,
        )
    return meta


def prepare_chat(
    inputs: list[str],
    out_dir: str | Path,
    *,
    tokenizer: str | Path,
    val_fraction: float = 0.05,
    seed: int = 1337,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Render chat JSONL `inputs` into `out_dir`: the pretraining format plus `{split}.mask`.

    `tokenizer` is what `resolve_tokenizer` takes. When its config has a `chat_template`
    (an instruct model), conversations are rendered with it; otherwise with dsfm's template,
    whose chat tokens are added to the tokenizer. The tokenizer is saved in `out_dir`.
    Returns the meta dict written to meta.json.
    """
    out_dir = Path(os.path.abspath(Path(out_dir).expanduser()))
    check_val_fraction(val_fraction, "conversations")
    check_out_dir(out_dir, force)
    check_inputs_outside(out_dir, inputs)
    sources = resolve_inputs(inputs)
    check_inputs_outside(out_dir, [s.path for s in sources])
    others = [s.path for s in sources if s.kind != "jsonl"]
    if others:
        raise ValueError(
            f"SFT inputs must be {JSONL_SUFFIX} files of chat records, got {others}; "
            f"name the .jsonl files directly or with a glob such as 'dir/*.jsonl'"
        )
    base = resolve_tokenizer(str(tokenizer))
    if base.chat_template:  # an instruct model's own template: no tokens to add
        tok, template = base, "jinja-" + sha256(base.chat_template.encode()).hexdigest()[:16]
        check_template(tok)
    else:
        tok, template = add_chat_tokens(base), CHAT_TEMPLATE

    with staged_dir(out_dir, replace=force) as tmp_dir, Tracker(enabled=progress) as bar:
        splits, source_records = _write_chat_splits(tmp_dir, sources, tok, val_fraction, seed, bar)
        meta = write_meta(
            tmp_dir,
            tok,
            splits,
            source_records,
            val_fraction=val_fraction,
            seed=seed,
            loss_mask=True,
            mask_dtype=MASK_DTYPE.name,
            chat_template=template,
            chat_tokens={} if base.chat_template else chat_token_ids(tok),
            end_of_turn=end_of_turn_id(tok),
            base_vocab_size=base.vocab_size,
        )
    return meta


# ---------------------------------------------------------------------------------------
# Checks shared by both


def check_inputs_outside(out_dir: Path, inputs: list[str]) -> None:
    """`--force` replaces `out_dir` whole: an input inside it (or the directory itself)
    would be deleted with the old dataset, so it is refused before anything is read."""
    if not out_dir.is_dir():
        return
    for item in map(str, [inputs] if isinstance(inputs, (str, Path)) else inputs):
        path = Path(item).expanduser()
        if not (path.exists() or path.is_symlink()):
            continue  # stdlib, hf:NAME, a glob: their files are checked once resolved
        # as written (a link inside is deleted) and as resolved (a link to the output)
        pairs = [(Path(os.path.abspath(path)), out_dir), (path.resolve(), out_dir.resolve())]
        if any(p == root or root in p.parents for p, root in pairs):
            raise ValueError(
                f"input {item} lies inside the output directory {out_dir}, and --force "
                "would delete it with the old dataset; move the input out first, "
                "or write the dataset to another --out"
            )


def check_val_fraction(val_fraction: float, unit: str) -> None:
    if not (isinstance(val_fraction, (int, float)) and 0 <= val_fraction < 1):
        raise ValueError(
            f"val_fraction={val_fraction!r} must be in [0, 1), e.g. 0.01 for 1% of {unit} "
            f"(0 for no validation split)"
        )


def check_out_dir(out_dir: Path, force: bool) -> None:
    if not (out_dir.exists() or out_dir.is_symlink()):
        return
    if not force:
        raise FileExistsError(
            f"{out_dir} already exists; pass force=True (`--force`) to replace it, "
            f"or choose another output directory"
        )
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise FileExistsError(
            f"{out_dir} exists and is a file or symlink, not a dataset directory; "
            f"remove it yourself or pick another path"
        )
    if any(out_dir.iterdir()) and not is_dataset_dir(out_dir):
        raise FileExistsError(
            f"refusing to replace {out_dir}: it is not empty and has no {META_FILE}, so it "
            f"does not look like a prepared dataset; remove it yourself or pick another path"
        )


def resolve_tokenizer(tokenizer: str | None) -> Tokenizer | None:
    """A tokenizer.json file, a directory holding one (dataset, run, checkpoint, Hugging Face
    model) or a cached hub id (`org/name`), with the config files beside it; "byte"; None
    means: train one on the corpus once it has been read."""
    if tokenizer is None:
        return None
    if tokenizer == BYTE_TOKENIZER:
        return byte_tokenizer()
    path = Path(tokenizer).expanduser()
    if not path.exists() and looks_like_hub_id(tokenizer):
        path = local_path(tokenizer)
    return Tokenizer.load(path)


class _Counts:
    """Counts for the progress bar, advanced as batches are written."""

    def __init__(self, progress: Tracker, task: int) -> None:
        self.progress, self.task = progress, task
        self.docs = self.bytes = self.tokens = 0

    def done(self, batch_bytes: int, docs: int, tokens: int) -> None:
        self.docs += docs
        self.bytes += batch_bytes
        self.tokens += tokens
        detail = f"{self.docs:,} docs, {self.tokens:,} tokens"
        self.progress.update(self.task, advance=batch_bytes, detail=detail)

    def finish(self) -> None:
        self.progress.finish(self.task)


# ---------------------------------------------------------------------------------------
# Text


def _train_tokenizer(
    sources: list[Source], opts: PrepareOptions, vocab_size: int, progress: Tracker
) -> Tokenizer:
    task = progress.add_task("reading for BPE", input_bytes(sources, opts.max_bytes), "B")
    n_docs = n_bytes = 0

    def texts() -> Iterator[str]:
        nonlocal n_docs, n_bytes
        for source in sources:
            docs = read_documents(
                source, opts.text_key, opts.max_bytes, doc_separator=opts.doc_separator
            )
            for doc, consumed, _ in docs:
                n_docs += 1
                n_bytes += consumed
                progress.update(task, advance=consumed, detail=f"{n_docs:,} docs")
                yield doc
        progress.update(task, description=f"training BPE ({vocab_size} tokens)")

    tokenizer = train_bpe(texts(), vocab_size)
    if n_docs == 0:
        raise ValueError(f"empty corpus: inputs {[s.path for s in sources]} hold no text")
    progress.finish(task, description="trained BPE")
    return tokenizer


def line_end_ids(tokenizer: Tokenizer) -> np.ndarray:
    """`clean[id]`: the ids a val cut may follow: EOT, and tokens whose text ends a line."""
    vocab = tokenizer.vocab_size
    texts = tokenizer.hf_tokenizer.decode_batch([[i] for i in range(vocab)])
    clean = np.fromiter((t.endswith("\n") for t in texts), dtype=bool, count=vocab)
    clean[tokenizer.eot_id] = True
    return clean


def _write_splits(
    out_dir: Path,
    sources: list[Source],
    tokenizer: Tokenizer,
    opts: PrepareOptions,
    progress: Tracker,
) -> tuple[dict, list[dict], int]:
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {
        split: ShardedSplitWriter(out_dir, split, dtype, opts.max_shard_bytes) for split in SPLITS
    }
    assigner = TextSplitAssigner(
        writers, opts.val_fraction, opts.seed, line_end_ids(tokenizer), tokenizer.eot_id
    )
    task = progress.add_task("tokenizing", input_bytes(sources, opts.max_bytes), "B")
    encoder = BatchEncoder(tokenizer, dtype, opts.workers)
    try:
        source_records = _tokenize_sources(
            sources, opts, encoder, assigner, _Counts(progress, task)
        )
        assigner.finish()
    finally:
        encoder.close()
        for writer in writers.values():
            writer.close()
    if sum(w.n_docs for w in writers.values()) == 0:
        raise ValueError(
            f"empty corpus: inputs {[s.path for s in sources]} hold no non-empty documents"
        )
    return {s: w.split_record() for s, w in writers.items()}, source_records, assigner.cut_tokens


def _tokenize_sources(
    sources: list[Source],
    opts: PrepareOptions,
    encoder: BatchEncoder,
    assigner: TextSplitAssigner,
    counts: _Counts,
) -> list[dict]:
    batch_bytes_in_flight: deque[int] = deque()
    batch_ends_in_flight: deque[list[bool]] = deque()

    def take(results: Iterator[tuple]) -> None:
        for flat, lengths in results:
            ends = batch_ends_in_flight.popleft()
            start = 0
            for n, end in zip(lengths.tolist(), ends):
                assigner.add(flat[start : start + n], end)
                start += n
            counts.done(batch_bytes_in_flight.popleft(), sum(ends), len(flat))

    def submit() -> None:
        nonlocal batch, starts, ends, batch_bytes
        if batch:
            batch_bytes_in_flight.append(batch_bytes)
            batch_ends_in_flight.append(ends)
            take(encoder.submit(batch, starts, ends))
        batch, starts, ends, batch_bytes = [], [], [], 0

    source_records = []
    batch: list[str] = []
    starts: list[bool] = []
    ends: list[bool] = []
    batch_bytes = 0
    for source in sources:
        stats = SourceStats()
        if source.kind == "tokens":
            submit()
            take(encoder.drain())  # everything before the array goes first, in order
            _copy_token_array(source, encoder.tokenizer, encoder.dtype, opts, assigner, counts)
            stats.bytes = os.path.getsize(source.path)
            stats.file_sha256 = file_sha256(Path(source.path))
            source_records.append(stats.record(source))
            continue
        pieces = read_documents(source, opts.text_key, opts.max_bytes, stats, opts.doc_separator)
        start = True
        for text, consumed, end in pieces:
            stats.chars += len(text)
            batch.append(text)
            starts.append(start)
            ends.append(end)
            start = end
            batch_bytes += consumed
            if batch_bytes >= ENCODE_BATCH_BYTES or len(batch) >= ENCODE_BATCH_DOCS:
                submit()
        source_records.append(stats.record(source))
    submit()
    take(encoder.drain())
    counts.finish()
    return source_records


def _copy_token_array(
    source: Source,
    tokenizer: Tokenizer,
    dtype: np.dtype,
    opts: PrepareOptions,
    assigner: TextSplitAssigner,
    counts: _Counts,
) -> None:
    array = open_token_array(source.path, opts.dtype, tokenizer.vocab_size)
    pieces = token_documents(source.path, array, tokenizer.vocab_size, tokenizer.eot_id, dtype)
    for ids, consumed, end in pieces:
        assigner.add(ids, end)
        counts.done(consumed, int(end), len(ids))


# ---------------------------------------------------------------------------------------
# Chat


def _conversations(source: Source, stats: SourceStats) -> Iterator[tuple[list[dict], int]]:
    """Yield `(messages, input bytes consumed)` per record; errors name file and line."""
    for record, where, n_bytes in jsonl_records(source.path, stats):
        try:
            messages = parse_record(record)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        yield messages, n_bytes


def _render_batch(batch: list[list[dict]], tokenizer: Tokenizer, assigner: SplitAssigner) -> int:
    """Render a batch of conversations into the assigner; return the tokens written."""
    if tokenizer.chat_template:  # the model's own template renders one at a time
        n_tokens = 0
        for messages in batch:
            ids, mask = render(messages, tokenizer)
            assigner.add(np.array([ids, mask], dtype=token_dtype(tokenizer.vocab_size)))
            n_tokens += len(ids)
        return n_tokens
    template = Template.of(tokenizer)
    contents = encode_contents(tokenizer, [m["content"] for messages in batch for m in messages])
    n_tokens = start = 0
    for messages in batch:
        end = start + len(messages)
        ids, mask = assemble([m["role"] for m in messages], contents[start:end], template)
        start = end
        assigner.add(np.array([ids, mask], dtype=token_dtype(tokenizer.vocab_size)))
        n_tokens += len(ids)
    return n_tokens


def _write_chat_splits(
    out_dir: Path,
    sources: list[Source],
    tokenizer: Tokenizer,
    val_fraction: float,
    seed: int,
    progress: Tracker,
) -> tuple[dict, list[dict]]:
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {split: MaskedSplitWriter(out_dir, split, dtype) for split in SPLITS}
    assigner = SplitAssigner(writers, val_fraction, seed)
    task = progress.add_task("rendering", input_bytes(sources, None), "B")
    counts = _Counts(progress, task)
    source_records = []
    batch: list[list[dict]] = []
    batch_bytes = 0
    try:
        for source in sources:
            stats = SourceStats()
            n_records = 0
            for messages, consumed in _conversations(source, stats):
                batch.append(messages)
                batch_bytes += consumed
                n_records += 1
                if batch_bytes >= ENCODE_BATCH_BYTES or len(batch) >= ENCODE_BATCH_DOCS:
                    counts.done(batch_bytes, len(batch), _render_batch(batch, tokenizer, assigner))
                    batch, batch_bytes = [], 0
            source_records.append(
                {
                    "path": source.path,
                    "bytes": stats.bytes,
                    "sha256": stats.sha256.hexdigest(),
                    "conversations": n_records,
                }
            )
        counts.done(batch_bytes, len(batch), _render_batch(batch, tokenizer, assigner))
        counts.finish()
        assigner.finish()
    finally:
        for writer in writers.values():
            writer.close()
    if counts.docs == 0:
        raise ValueError(f"no conversations: inputs {[s.path for s in sources]} hold no records")
    splits = {
        split: {
            "tokens": int(w.n_tokens),
            "docs": w.n_docs,
            "loss_tokens": w.n_loss_tokens,
            "shards": [w.shard_record()],
        }
        for split, w in writers.items()
    }
    return splits, source_records


# ---------------------------------------------------------------------------------------
# The command


def parse_size(text: str) -> int:
    """'500MB', '2GiB', '1e9' or '1048576' -> bytes."""
    units = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    t = text.strip().upper().removesuffix("B")
    binary = t.endswith("I")
    t = t.removesuffix("I")
    unit = t[-1] if t and t[-1] in "KMGT" else ""
    try:
        number = float(t[: len(t) - len(unit)])
    except ValueError:
        raise ValueError(f"--shard-size {text!r} is not a size (e.g. 500MB, 2GiB)") from None
    scale = 1024 ** "_KMGT".index(unit) if binary and unit else units[unit]
    return int(number * scale)


def prepare_command(
    input: list[str],
    out: str,
    tokenizer: str | None,
    vocab_size: int,
    text_key: str,
    val_fraction: float,
    seed: int,
    max_bytes: int | None,
    workers: int,
    shard_size: str | None,
    doc_separator: str | None,
    dtype: str | None,
    force: bool,
    chat: bool,
) -> int:
    if chat:
        if not tokenizer or tokenizer == BYTE_TOKENIZER:
            raise ValueError(
                f"--chat needs --tokenizer PATH: the {TOKENIZER_FILE} of the model you "
                "will fine-tune (a run dir or checkpoint tag holds one)"
            )
        meta = prepare_chat(
            input, out, tokenizer=tokenizer, val_fraction=val_fraction, seed=seed, force=force
        )
    else:
        meta = prepare(
            input,
            out,
            tokenizer=tokenizer,
            vocab_size=vocab_size,
            text_key=text_key,
            val_fraction=val_fraction,
            seed=seed,
            max_bytes=max_bytes,
            workers=workers,
            max_shard_bytes=parse_size(shard_size) if shard_size else None,
            doc_separator=doc_separator,
            dtype=dtype,
            force=force,
        )
    s = meta["splits"]
    print(
        f"wrote {out}: vocab {meta['vocab_size']}, {meta['dtype']}, "
        f"train {s['train']['tokens']:,} tokens / {s['train']['docs']:,} docs, "
        f"val {s['val']['tokens']:,} tokens / {s['val']['docs']:,} docs"
    )
    note = split_note(meta)
    if note:
        print(note)
    return 0


def split_note(meta: dict[str, Any]) -> str | None:
    """Why val is empty, or where it came from when it is not whole documents."""
    val = meta["splits"]["val"]
    if val["tokens"] == 0:
        reason = (
            "--val-fraction 0"
            if not meta["val_fraction"]
            else "the corpus is too small to cut one from"
        )
        return (
            f"val is empty ({reason}): training will run without validation, a best "
            "checkpoint or early stopping; pass --val-fraction 0.01 (or more) to have one"
        )
    if meta.get("val_cut_tokens"):
        return (
            f"val: whole documents could not make up --val-fraction {meta['val_fraction']} "
            f"of the tokens, so the last {meta['val_cut_tokens']:,} tokens of the corpus "
            "were cut from train into val (after a line end)"
        )
    return None
