"""Small real tokenizers in the style of the common model families, written as a Hugging Face
model directory holds them (tokenizer.json + tokenizer_config.json / special_tokens_map.json),
with the families' chat templates. Made with `tokenizers`; transformers reads them."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# The split pattern of Llama 3 and Qwen2 (Qwen2 splits digits one by one).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")

# Llama 3 Instruct's template (as published, without tools).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
# Qwen2.5 Instruct's ChatML template (without tools), default system message included.
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. 12345 apples and 678 pears.\n",
    "def add(a, b):\n    return a + b  # the sum\n\n",
    "Hello there! How are you today? I am fine, thanks for asking.\n",
    "Tokenizers split text into pieces; models learn which piece comes next.\n",
    "héllo wörld — naïve café, 日本語 🚀\n",
] * 20


def _bpe(split: str, specials: list[str], vocab_size: int = 420) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def _save(out: Path, tok: Tokenizer, config: dict, special_map: dict | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    base = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(base | config, indent=2))
    if special_map is not None:
        (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    return out


def llama3(out: Path, *, instruct: bool = True) -> Path:
    """Llama 3 style: BOS <|begin_of_text|> added by the post-processor (the config does
    not say add_bos_token), eos <|eot_id|> for Instruct (<|end_of_text|> for the base)."""
    specials = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]
    tok = _bpe(LLAMA3_SPLIT, specials)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                special_tokens=[("<|begin_of_text|>", bos)],
            ),
        ]
    )
    config = {
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>" if instruct else "<|end_of_text|>",
    }
    if instruct:
        config["chat_template"] = LLAMA3_TEMPLATE
    return _save(out, tok, config)


def qwen2(out: Path, *, instruct: bool = True) -> Path:
    """Qwen2 style: no BOS; eos <|im_end|> for Instruct (<|endoftext|> for the base), pad
    <|endoftext|>; ChatML template."""
    tok = _bpe(QWEN_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    config = {
        "bos_token": None,
        "eos_token": "<|im_end|>" if instruct else "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
    }
    if instruct:
        config["chat_template"] = QWEN_TEMPLATE
    return _save(out, tok, config)


def mistral(out: Path) -> Path:
    """Llama 2 / Mistral style: <s> and </s>, named in special_tokens_map.json; the config
    says add_bos_token (and the post-processor adds it, as theirs does)."""
    tok = _bpe(LLAMA3_SPLIT, ["<unk>", "<s>", "</s>"])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", bos)]
    )
    return _save(
        out,
        tok,
        {"add_bos_token": True, "add_eos_token": False},
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    )
