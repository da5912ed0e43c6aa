"""Tokenizers: byte-level BPE on Hugging Face `tokenizers`, one file format.

Design choices:
- Everything is a `tokenizers.Tokenizer` serialized as `tokenizer.json`, so a Hugging Face
  export copies the file and the model sees exactly the ids it was trained on.
- Byte-level, no normalizer, no prefix space: every unicode string (whitespace runs, emoji,
  CJK) round-trips exactly, and no text is ever out of vocabulary.
- One special token, `EOT`, separates documents. `encode` never adds it and never produces
  it from text: a literal "<|endoftext|>" inside a document is encoded as ordinary bytes, so
  document boundaries come only from the data pipeline. `decode` keeps it, so a decoded
  stream shows where documents end.
- `byte_tokenizer()` is a BPE with the 256 byte symbols and no merges (id == byte value),
  plus EOT as id 256: the tiny vocabulary that tests and smoke runs use.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
N_BYTES = 256


class Tokenizer:
    """A `tokenizers.Tokenizer` with EOT as its document separator."""

    def __init__(self, hf_tokenizer: tokenizers.Tokenizer) -> None:
        eot_id = hf_tokenizer.token_to_id(EOT)
        if eot_id is None:
            raise ValueError(f"tokenizer has no {EOT!r} token; dsfm needs it to separate documents")
        # Runtime-only flag (not serialized): text that spells out EOT stays text.
        hf_tokenizer.encode_special_tokens = True
        self.hf_tokenizer = hf_tokenizer
        self._eot_id = eot_id

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return self.hf_tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int:
        return self._eot_id

    def encode(self, text: str) -> list[int]:
        return self.hf_tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast skips offset tracking, which we never use; it runs in parallel.
        encodings = self.hf_tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        return self.hf_tokenizer.decode(ids, skip_special_tokens=False)

    def save(self, dir: str | Path) -> Path:
        """Write `dir/tokenizer.json` (creating `dir`) and return its path."""
        path = Path(dir) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self.hf_tokenizer.save(str(path))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer.json file, or the tokenizer.json inside a directory."""
        file = tokenizer_file(path)
        if not file.is_file():
            raise FileNotFoundError(
                f"no tokenizer at {file}: pass a tokenizer.json file or a directory holding "
                f"one (e.g. a prepared data dir), or let `dsfm prepare` train a new one"
            )
        try:
            hf_tokenizer = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(
                f"{file} is not a valid Hugging Face tokenizer.json ({e}); "
                f"re-create it with `dsfm prepare` or re-export it from its source"
            ) from e
        try:
            return cls(hf_tokenizer)
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from e

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eot_id={self.eot_id})"


def tokenizer_file(path: str | Path) -> Path:
    """The tokenizer file of a directory that holds one (dataset, run, checkpoint tag, export),
    or `path` itself when it names a file."""
    path = Path(path)
    return path / TOKENIZER_FILE if path.is_dir() else path


def copy_tokenizer(src: str | Path, dst_dir: str | Path) -> Path:
    """Copy a tokenizer (file, or a directory's) byte for byte into `dst_dir`; its new path."""
    dst = Path(dst_dir) / TOKENIZER_FILE
    shutil.copyfile(tokenizer_file(src), dst)
    return dst


def _byte_level_parts(hf_tokenizer: tokenizers.Tokenizer) -> None:
    hf_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_tokenizer.decoder = decoders.ByteLevel()


def _byte_symbols() -> list[str]:
    """The printable character that byte-level BPE uses for each byte value, in byte order.

    Bytes that are already visible latin-1 characters stand for themselves; the rest
    (control characters, space, a few latin-1 blanks) are shifted past 255 in order. This is
    the table the ByteLevel pre-tokenizer applies, so tokens line up with its output.
    """
    visible = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)}
    symbols = {}
    shifted = 0
    for b in range(N_BYTES):
        if b in visible:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(N_BYTES + shifted)
            shifted += 1
    return [symbols[b] for b in range(N_BYTES)]


def byte_tokenizer() -> Tokenizer:
    """256 byte tokens (id == byte value) + EOT (id 256): vocab 257, lossless."""
    vocab = {symbol: b for b, symbol in enumerate(_byte_symbols())}
    assert set(vocab) == set(pre_tokenizers.ByteLevel.alphabet())
    hf_tokenizer = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    _byte_level_parts(hf_tokenizer)
    hf_tokenizer.add_special_tokens([EOT])
    return Tokenizer(hf_tokenizer)


def train_bpe(texts: Iterable[str], vocab_size: int, *, progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE with `vocab_size` ids (EOT included) on `texts`.

    A small corpus may run out of pairs to merge first; the result is then smaller than
    asked, and `Tokenizer.vocab_size` tells the real size.
    """
    if vocab_size < N_BYTES + 1:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs the {N_BYTES} byte "
            f"tokens plus {EOT}, so at least {N_BYTES + 1} (use the byte tokenizer for that)"
        )
    hf_tokenizer = tokenizers.Tokenizer(models.BPE())
    _byte_level_parts(hf_tokenizer)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    hf_tokenizer.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf_tokenizer)
