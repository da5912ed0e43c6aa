"""Instruction data for supervised fine-tuning: the chat template, its loss mask, `prepare_sft`.

Design choices:
- Template "dsfm-v1". Each message renders as `ROLE + "\\n" + content + END + "\\n"` and a
  conversation ends with EOT:

      <|system|>\\nBe brief.<|end|>\\n<|user|>\\nHi<|end|>\\n<|assistant|>\\nHello!<|end|>\\n
      <|endoftext|>

  (one string, wrapped here). A generation prompt is the history followed by
  `<|assistant|>\\n` (`render_prompt`); sampling stops at END.
- The loss mask is 1 on the tokens the model must learn to produce: assistant content and
  the END that closes it. Everything else is 0: role tokens, the "\\n" after them, system
  and user content, the "\\n" after END, and the final EOT. Generation stops at END, so
  what follows it (the "\\n", the next role token, EOT) is template written by whoever
  drives the conversation, never something the model has to choose.
- `mask[t]` marks token `t` as a target. With the usual shift (`labels[t] = tokens[t+1]`)
  position `t` is trained when `mask[t+1]` is 1; `dataset.masked_labels` does that shift.
- Ids are built per segment: role tokens and END by id, text through `Tokenizer.encode`,
  which never produces a special id (a user who types "<|assistant|>" gets its bytes). So
  the mask boundary falls exactly between segments with no offset mapping, and user text
  cannot forge a turn. The price is that BPE cannot merge across a segment boundary
  (template "\\n" + content that starts with "\\n"); training and `render_prompt` segment
  identically, so the model sees one consistent tokenization.
- Chat tokens are special tokens appended after the existing vocabulary, so every
  pretrained id keeps its meaning; the model grows to match with
  `lora.resize_token_embeddings(model, meta["vocab_size"])`.
- `prepare_sft` writes the pretraining format (`{split}.bin/.idx`, `tokenizer.json`,
  `meta.json`, read by `read_meta` and `TokenDataset` unchanged) plus `{split}.mask`, one
  uint8 per token, and marks `meta.json` with `"loss_mask": true` and the template name.
- Input resolution, the seeded per-conversation split, the atomic temp-dir publish and the
  progress bar are prepare's own. A conversation travels through prepare's `SplitAssigner`
  as one (2, n) array (row 0 tokens, row 1 mask), so its hold-back-the-last rule that
  keeps both splits non-empty applies unchanged. Inputs must be `.jsonl`: one record a line.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers

from dsfm.data.dataset import read_meta
from dsfm.data.prepare import (
    ENCODE_BATCH_BYTES,
    ENCODE_BATCH_DOCS,
    SPLITS,
    Source,
    SourceStats,
    SplitAssigner,
    SplitWriter,
    _check_out_dir,
    _input_bytes,
    _make_progress,
    _resolve_tokenizer,
    jsonl_records,
    resolve_inputs,
    staged_dir,
    token_dtype,
    write_meta,
)
from dsfm.tokenizer import EOT, Tokenizer

SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
CHAT_TOKENS = (SYSTEM, USER, ASSISTANT, END)
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
CHAT_TEMPLATE = "dsfm-v1"
MASK_DTYPE = np.dtype(np.uint8)
JSONL_SUFFIX = ".jsonl"


# ---------------------------------------------------------------------------------------
# Tokens


def add_chat_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """A copy of `tokenizer` with the chat tokens as special tokens, appended after its ids.

    Idempotent: tokens already present as special tokens keep their ids. The input
    tokenizer is left untouched.
    """
    hf = tokenizers.Tokenizer.from_str(tokenizer.hf_tokenizer.to_str())
    special = {t.content for t in hf.get_added_tokens_decoder().values() if t.special}
    for token in CHAT_TOKENS:
        if hf.token_to_id(token) is not None and token not in special:
            # Marking an ordinary vocabulary entry special would change what old ids mean.
            raise ValueError(
                f"{token!r} is an ordinary token of this tokenizer, not a special one; "
                f"the chat template needs it reserved, so use a tokenizer without it"
            )
    missing = [t for t in CHAT_TOKENS if t not in special]
    n_before = hf.get_vocab_size(with_added_tokens=True)
    hf.add_special_tokens(missing)
    ids = [hf.token_to_id(t) for t in missing]
    if ids != list(range(n_before, n_before + len(missing))):
        raise ValueError(
            f"chat tokens got ids {ids}, not the next free ids from {n_before}: the tokenizer's "
            f"vocabulary has gaps, so the model's embedding could not simply grow to fit"
        )
    return Tokenizer(hf)


def chat_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """Id of each chat token; an error if `add_chat_tokens` has not been applied."""
    ids = {t: tokenizer.hf_tokenizer.token_to_id(t) for t in CHAT_TOKENS}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"tokenizer has no {missing} tokens; pass it through add_chat_tokens")
    return ids


@dataclass(frozen=True)
class _Template:
    """The fixed ids of the template for one tokenizer."""

    role_ids: dict[str, int]
    end_id: int
    newline: list[int]
    eot_id: int

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> _Template:
        ids = chat_token_ids(tokenizer)
        role_ids = {role: ids[token] for role, token in ROLE_TOKENS.items()}
        return cls(role_ids, ids[END], tokenizer.encode("\n"), tokenizer.eot_id)


# ---------------------------------------------------------------------------------------
# Conversations


def check_messages(messages: object, *, require_assistant: bool = True) -> list[dict]:
    """Validate a message list; return it. Errors say which message is wrong and how."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {role, content} objects")
    for i, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} is a {type(message).__name__}, not an object")
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"message {i} has no {key!r} key (found {sorted(message)})")
        if message["role"] not in ROLE_TOKENS:
            raise ValueError(
                f"message {i} has unknown role {message['role']!r}; "
                f"valid roles: {', '.join(sorted(ROLE_TOKENS))}"
            )
        content = message["content"]
        if not isinstance(content, str):
            raise ValueError(f"message {i}'s content is a {type(content).__name__}, not a string")
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise ValueError("conversation has no assistant turn, so nothing to learn from it")
    return messages


def parse_record(record: object) -> list[dict]:
    """Messages of one JSONL record: `{"messages": [...]}` or `{"prompt", "response"}`."""
    if not isinstance(record, dict):
        raise ValueError(f"record is a {type(record).__name__}, not a JSON object")
    has_pair = "prompt" in record or "response" in record
    if "messages" in record:
        if has_pair:
            raise ValueError("record has both 'messages' and 'prompt'/'response'; use one form")
        return check_messages(record["messages"])
    if has_pair:
        for key in ("prompt", "response"):
            if key not in record:
                raise ValueError(f"record has no {key!r} key (found {sorted(record)})")
            if not isinstance(record[key], str):
                raise ValueError(f"{key!r} is a {type(record[key]).__name__}, not a string")
        messages = [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["response"]},
        ]
        return check_messages(messages)
    raise ValueError(
        f"record has neither 'messages' nor 'prompt'/'response' (found {sorted(record)})"
    )


def render_text(messages: Sequence[dict]) -> str:
    """The conversation as text, EOT included: what `decode(render(...)[0])` gives back."""
    turns = "".join(f"{ROLE_TOKENS[m['role']]}\n{m['content']}{END}\n" for m in messages)
    return turns + EOT


def _assemble(
    roles: Sequence[str], contents: Sequence[list[int]], template: _Template
) -> tuple[list[int], list[int]]:
    """Token ids and loss mask from each message's role and encoded content."""
    ids: list[int] = []
    mask: list[int] = []
    for role, content in zip(roles, contents, strict=True):
        learn = int(role == "assistant")
        header = [template.role_ids[role], *template.newline]
        ids += header + content + [template.end_id] + template.newline
        mask += [0] * len(header) + [learn] * (len(content) + 1) + [0] * len(template.newline)
    ids.append(template.eot_id)
    mask.append(0)
    return ids, mask


def render(messages: Sequence[dict], tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of a conversation (EOT-terminated) and its 0/1 loss mask, same length."""
    check_messages(messages)
    contents = tokenizer.encode_batch([m["content"] for m in messages])
    return _assemble([m["role"] for m in messages], contents, _Template.of(tokenizer))


def prompt_ids(tokenizer: Tokenizer, text: str, *, chat: bool) -> tuple[list[int], int]:
    """(prompt ids, stop id) for sampling: a user turn of a chat model, stopping at END, or
    plain text continued until EOT."""
    if chat:
        return render_prompt([{"role": "user", "content": text}], tokenizer), _Template.of(
            tokenizer
        ).end_id
    return tokenizer.encode(text) or [tokenizer.eot_id], tokenizer.eot_id


def render_prompt(messages: Sequence[dict], tokenizer: Tokenizer) -> list[int]:
    """Ids to generate the next assistant turn from: the history, then `<|assistant|>\\n`.

    Sample until END; the reply is the tokens before it.
    """
    template = _Template.of(tokenizer)
    ids: list[int] = []
    if messages:
        check_messages(list(messages), require_assistant=False)
        contents = tokenizer.encode_batch([m["content"] for m in messages])
        ids, _ = _assemble([m["role"] for m in messages], contents, template)
        ids.pop()  # the conversation goes on, so no EOT
    return ids + [template.role_ids["assistant"], *template.newline]


# ---------------------------------------------------------------------------------------
# Dataset


class MaskedSplitWriter(SplitWriter):
    """prepare's `SplitWriter` plus `{split}.mask`; `add` takes a (2, n) tokens-and-mask array."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype) -> None:
        super().__init__(out_dir, split, dtype)
        self.mask_path = out_dir / f"{split}.mask"
        self._mask_file = open(self.mask_path, "wb")
        self._mask_buffer: list[np.ndarray] = []
        self.n_loss_tokens = 0

    def add(self, conversation: np.ndarray) -> None:
        tokens, mask = conversation
        # Buffered before super().add, which may flush both buffers.
        self._mask_buffer.append(mask.astype(MASK_DTYPE))
        self.n_loss_tokens += int(mask.sum())
        super().add(tokens)

    def flush(self) -> None:
        super().flush()
        if self._mask_buffer:
            self._mask_file.write(np.concatenate(self._mask_buffer).tobytes())
        self._mask_buffer = []

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._mask_file.close()


def _conversations(source: Source, stats: SourceStats) -> Iterator[tuple[list[dict], int]]:
    """Yield `(messages, input bytes consumed)` per record; errors name file and line."""
    for record, where, n_bytes in jsonl_records(source.path, stats):
        try:
            messages = parse_record(record)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        yield messages, n_bytes


def _encode_batch(
    batch: list[list[dict]], tokenizer: Tokenizer, template: _Template, assigner: SplitAssigner
) -> int:
    """Render a batch of conversations into the assigner; return the tokens written."""
    contents = tokenizer.encode_batch([m["content"] for messages in batch for m in messages])
    n_tokens = start = 0
    for messages in batch:
        end = start + len(messages)
        ids, mask = _assemble([m["role"] for m in messages], contents[start:end], template)
        start = end
        assigner.add(np.array([ids, mask], dtype=token_dtype(tokenizer.vocab_size)))
        n_tokens += len(ids)
    return n_tokens


def _write_sft_splits(
    out_dir: Path,
    sources: list[Source],
    tokenizer: Tokenizer,
    val_fraction: float,
    seed: int,
    progress,
) -> tuple[dict, list[dict]]:
    template = _Template.of(tokenizer)
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {split: MaskedSplitWriter(out_dir, split, dtype) for split in SPLITS}
    assigner = SplitAssigner(writers, val_fraction, seed)
    task = progress.add_task(
        "rendering", total=_input_bytes(sources, None), docs=0, mb=0.0, tokens=0
    )
    source_records = []
    batch: list[list[dict]] = []
    batch_bytes = n_docs = n_bytes = n_tokens = 0
    try:
        for source in sources:
            stats = SourceStats()
            n_records = 0
            for messages, consumed in _conversations(source, stats):
                batch.append(messages)
                batch_bytes += consumed
                n_records += 1
                if batch_bytes >= ENCODE_BATCH_BYTES or len(batch) >= ENCODE_BATCH_DOCS:
                    n_tokens += _encode_batch(batch, tokenizer, template, assigner)
                    n_docs, n_bytes = n_docs + len(batch), n_bytes + batch_bytes
                    progress.update(
                        task, advance=batch_bytes, docs=n_docs, mb=n_bytes / 1e6, tokens=n_tokens
                    )
                    batch, batch_bytes = [], 0
            source_records.append(
                {
                    "path": source.path,
                    "bytes": stats.bytes,
                    "sha256": stats.sha256.hexdigest(),
                    "conversations": n_records,
                }
            )
        n_tokens += _encode_batch(batch, tokenizer, template, assigner)
        n_docs, n_bytes = n_docs + len(batch), n_bytes + batch_bytes
        progress.update(
            task, completed=n_bytes, total=n_bytes, docs=n_docs, mb=n_bytes / 1e6, tokens=n_tokens
        )
        assigner.finish()
    finally:
        for writer in writers.values():
            writer.close()
    if n_docs == 0:
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


def _jsonl_sources(inputs: list[str]) -> list[Source]:
    sources = resolve_inputs(inputs)
    others = [s.path for s in sources if s.kind != "jsonl"]
    if others:
        raise ValueError(
            f"SFT inputs must be {JSONL_SUFFIX} files of chat records, got {others}; "
            f"name the .jsonl files directly or with a glob such as 'dir/*.jsonl'"
        )
    return sources


def prepare_sft(
    inputs: list[str],
    out_dir: str | Path,
    *,
    tokenizer: str | Path,
    val_fraction: float = 0.05,
    seed: int = 1337,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Render chat JSONL `inputs` into `out_dir`: pretraining format plus `{split}.mask`.

    `tokenizer` is a tokenizer.json or a directory holding one (a prepared dataset, run or
    checkpoint), or "byte"; the chat tokens are added to it and the extended tokenizer is
    saved in `out_dir`. Returns the meta dict written to meta.json.
    """
    out_dir = Path(os.path.abspath(Path(out_dir).expanduser()))
    if not (isinstance(val_fraction, (int, float)) and 0 <= val_fraction < 1):
        raise ValueError(
            f"val_fraction={val_fraction!r} must be in [0, 1), e.g. 0.05 for 5% of "
            f"conversations (0 for no validation split)"
        )
    _check_out_dir(out_dir, force)
    sources = _jsonl_sources(inputs)
    base = _resolve_tokenizer(str(tokenizer))
    tok = add_chat_tokens(base)

    with staged_dir(out_dir, force) as tmp_dir, _make_progress(progress) as bar:
        splits, source_records = _write_sft_splits(tmp_dir, sources, tok, val_fraction, seed, bar)
        meta = write_meta(
            tmp_dir,
            tok,
            splits,
            source_records,
            val_fraction=val_fraction,
            seed=seed,
            loss_mask=True,
            mask_dtype=MASK_DTYPE.name,
            chat_template=CHAT_TEMPLATE,
            chat_tokens=chat_token_ids(tok),
            base_vocab_size=base.vocab_size,
        )
    return meta


def read_sft_meta(data_dir: str | Path) -> dict:
    """`read_meta` plus the SFT checks: loss masks present, known template, mask sizes match."""
    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    hint = "run prepare_sft to (re)create it"
    if not meta.get("loss_mask"):
        raise ValueError(f"{data_dir} has no loss masks (a pretraining dataset?); {hint}")
    if meta.get("chat_template") != CHAT_TEMPLATE:
        raise ValueError(
            f"{data_dir} uses chat template {meta.get('chat_template')!r}; this dsfm writes and "
            f"reads {CHAT_TEMPLATE!r}; {hint}"
        )
    for split, counts in meta["splits"].items():
        path = data_dir / f"{split}.mask"
        expected = counts["tokens"] * MASK_DTYPE.itemsize
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; {hint}")
        if path.stat().st_size != expected:
            raise ValueError(
                f"{path} is {path.stat().st_size} bytes but {split}.bin holds {counts['tokens']} "
                f"tokens; the dataset is truncated or mixed from different runs, {hint}"
            )
    return meta
