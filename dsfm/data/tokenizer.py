"""Tokenizers: byte-level BPE on Hugging Face `tokenizers`, one file format.

Design choices:
- Everything is a `tokenizers.Tokenizer` serialized as `tokenizer.json`, so a Hugging Face
  export copies the file and the model sees exactly the ids it was trained on.
- Byte-level, no normalizer, no prefix space: every unicode string (whitespace runs, emoji,
  CJK) round-trips exactly, and no text is ever out of vocabulary.
- One special token separates documents: the family's end of text (`EOT` in dsfm's own
  tokenizers). `encode` never adds it and never produces it from text: a literal
  "<|endoftext|>" inside a document is encoded as ordinary bytes, so document boundaries
  come only from the data pipeline. `decode` keeps it, so a decoded stream shows where
  documents end.
- Any Hugging Face tokenizer works: its roles (BOS, EOS, padding, whether BOS starts a
  text, the chat template) come from its own `tokenizer_config.json` (and
  `special_tokens_map.json`, `chat_template.jinja`) beside `tokenizer.json`, or from the
  post-processor. The separator is the configured EOS unless that is an instruct model's
  end of turn and the vocabulary has an end-of-text token (`END_OF_TEXT`): documents end
  with end of text, turns with end of turn, and the two must differ for document masking
  to keep a conversation whole. A tokenizer is then two files: `tokenizer.json` and our
  `tokenizer_config.json` (the source's, with the other files folded in); dsfm's own
  tokenizers have no config, and their roles are the defaults (EOT, no BOS).
- `byte_tokenizer()` is a BPE with the 256 byte symbols and no merges (id == byte value),
  plus EOT as id 256: the tiny vocabulary that tests and smoke runs use.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# End-of-text tokens of the common families (GPT-2/Qwen, Llama 3, Llama 1-2/Mistral).
END_OF_TEXT = (EOT, "<|end_of_text|>", "</s>")
N_BYTES = 256


def token_content(value: object) -> str | None:
    """A special token as a config names it: a string, or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the roles of its special tokens.

    `config` is the tokenizer's `tokenizer_config.json` (empty for dsfm's own tokenizers).
    """

    def __init__(self, hf_tokenizer: tokenizers.Tokenizer, config: dict | None = None) -> None:
        self.config = dict(config or {})
        special = {t.content for t in hf_tokenizer.get_added_tokens_decoder().values() if t.special}

        def id_of(role: str) -> int | None:
            token = token_content(self.config.get(f"{role}_token"))
            if token is None:
                return None
            if hf_tokenizer.token_to_id(token) is None:
                raise ValueError(
                    f"{role}_token {token!r} of its {TOKENIZER_CONFIG} is not in the vocabulary"
                )
            return hf_tokenizer.token_to_id(token)

        eos = token_content(self.config.get("eos_token"))
        ends = [t for t in END_OF_TEXT if t in special]
        separator = eos if eos in END_OF_TEXT or not ends else ends[0]
        if separator is None or hf_tokenizer.token_to_id(separator) is None:
            raise ValueError(
                f"tokenizer has no end-of-sequence token to separate documents: neither an "
                f"eos_token in a {TOKENIZER_CONFIG} beside it nor {EOT!r}; put the model's "
                f"{TOKENIZER_CONFIG} (or {SPECIAL_TOKENS_MAP}) beside its {TOKENIZER_FILE}"
            )
        self._eot_id = hf_tokenizer.token_to_id(separator)
        self.eos_id = id_of("eos")
        self.bos_id = id_of("bos")
        self.pad_id = id_of("pad")
        self.add_bos = self.bos_id is not None and _adds_bos(hf_tokenizer, self.config, self.bos_id)
        # Runtime-only flag (not serialized): text that spells out EOT stays text.
        hf_tokenizer.encode_special_tokens = True
        self.hf_tokenizer = hf_tokenizer
        self._parser: tokenizers.Tokenizer | None = None

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return self.hf_tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int:
        return self._eot_id

    @property
    def chat_template(self) -> str | None:
        """The model's own Jinja chat template, if its config has one."""
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: transformers uses "default"
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        return template if isinstance(template, str) else None

    def token(self, id: int | None) -> str | None:
        return None if id is None else self.hf_tokenizer.id_to_token(id)

    def special_tokens(self) -> list[str]:
        added = self.hf_tokenizer.get_added_tokens_decoder()
        return [t.content for _, t in sorted(added.items()) if t.special]

    def encode_parsing_specials(self, text: str) -> list[int]:
        """Ids of text in which special tokens are written out (a rendered chat template),
        as transformers tokenizes it: specials parsed, none added."""
        if self._parser is None:
            self._parser = tokenizers.Tokenizer.from_str(self.hf_tokenizer.to_str())
        return self._parser.encode(text, add_special_tokens=False).ids

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
        """Write `dir/tokenizer.json` (creating `dir`), and its config when it has one;
        return the tokenizer.json path."""
        path = Path(dir) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self.hf_tokenizer.save(str(path))
        if self.config:
            _write_config(path.parent, self.config)
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
            return cls(hf_tokenizer, read_config(file.parent))
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from e

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, eot_id={self.eot_id}, "
            f"bos_id={self.bos_id}, add_bos={self.add_bos})"
        )


def _adds_bos(hf_tokenizer: tokenizers.Tokenizer, config: dict, bos_id: int) -> bool:
    """Whether the family starts a text with BOS: the config's add_bos_token, else what the
    tokenizer's post-processor does."""
    if isinstance(config.get("add_bos_token"), bool):
        return config["add_bos_token"]
    plain = hf_tokenizer.encode("a", add_special_tokens=False).ids
    full = hf_tokenizer.encode("a", add_special_tokens=True).ids
    return len(full) > len(plain) and full[0] == bos_id


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not readable JSON ({e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a JSON object")
    return obj


def read_config(dir: Path) -> dict:
    """A tokenizer directory's config: tokenizer_config.json, with the special tokens of
    special_tokens_map.json and the chat_template.jinja file folded in ({} if none)."""
    config = _read_json(dir / TOKENIZER_CONFIG) if (dir / TOKENIZER_CONFIG).is_file() else {}
    if (dir / SPECIAL_TOKENS_MAP).is_file():
        for key, value in _read_json(dir / SPECIAL_TOKENS_MAP).items():
            if config.get(key) is None:
                config[key] = value
    if (dir / CHAT_TEMPLATE_FILE).is_file() and not config.get("chat_template"):
        config["chat_template"] = (dir / CHAT_TEMPLATE_FILE).read_text()
    return config


def _write_config(dir: Path, config: dict) -> None:
    (dir / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def tokenizer_file(path: str | Path) -> Path:
    """The tokenizer file of a directory that holds one (dataset, run, checkpoint tag, export),
    or `path` itself when it names a file."""
    path = Path(path)
    return path / TOKENIZER_FILE if path.is_dir() else path


def tokenizer_files(path: str | Path) -> list[Path]:
    """The files that define the tokenizer of a dsfm directory: tokenizer.json, and its
    config when it has one (what its identity is hashed from)."""
    file = tokenizer_file(path)
    config = file.parent / TOKENIZER_CONFIG
    return [file, config] if config.is_file() else [file]


def copy_tokenizer(src: str | Path, dst_dir: str | Path) -> Path:
    """Copy a tokenizer (file, or a directory's) into `dst_dir`: tokenizer.json byte for
    byte, and its config (the source's other config files folded in); the new path."""
    file = tokenizer_file(src)
    dst = Path(dst_dir) / TOKENIZER_FILE
    shutil.copyfile(file, dst)
    others = [file.parent / n for n in (SPECIAL_TOKENS_MAP, CHAT_TEMPLATE_FILE)]
    if not any(p.is_file() for p in others):
        if (file.parent / TOKENIZER_CONFIG).is_file():  # byte for byte: the hash stays
            shutil.copyfile(file.parent / TOKENIZER_CONFIG, Path(dst_dir) / TOKENIZER_CONFIG)
    elif config := read_config(file.parent):
        _write_config(Path(dst_dir), config)
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
