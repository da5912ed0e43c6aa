"""Fine-tuning an instruct model with its own chat template: the ids are transformers'
`apply_chat_template` ids, and the loss mask covers exactly each assistant message's content
and the end-of-turn token that closes it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dsfm.data.chat import prompt_ids, render, render_prompt
from dsfm.data.format import read_meta
from dsfm.data.prepare import prepare_chat
from dsfm.data.tokenizer import Tokenizer
from tests import family_tokenizers as families

transformers = pytest.importorskip("transformers")

CONVERSATIONS = [
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello there!"},
        {"role": "assistant", "content": "Hi. How are you today?"},
        {"role": "user", "content": "def add(a, b):\n    return a + b"},
        {"role": "assistant", "content": " It returns the sum.\n\nThanks for asking."},
        {"role": "user", "content": "héllo wörld 🚀"},
        {"role": "assistant", "content": "日本語 12345"},
    ],
    [
        {"role": "user", "content": "The quick brown fox?"},
        {"role": "assistant", "content": "jumps over the lazy dog."},
    ],
]
FAMILIES = {"llama3": (families.llama3, "<|eot_id|>"), "qwen2": (families.qwen2, "<|im_end|>")}


@pytest.fixture(params=sorted(FAMILIES))
def family(request, tmp_path):
    make, end_of_turn = FAMILIES[request.param]
    tok_dir = make(tmp_path / request.param)
    hf = transformers.AutoTokenizer.from_pretrained(tok_dir)
    return Tokenizer.load(tok_dir), hf, end_of_turn, tok_dir


def hf_ids(hf, messages, add_generation_prompt=False) -> list[int]:
    return list(
        hf.apply_chat_template(
            messages,
            tokenize=True,
            add_generation_prompt=add_generation_prompt,
            return_dict=False,
        )
    )


def runs(ids: list[int], mask: list[int]) -> list[list[int]]:
    """The maximal stretches of ids where the mask is 1."""
    out, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            out.append(current)
            current = []
    return out + ([current] if current else [])


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["multi-turn+system", "one-turn"])
def test_ids_are_apply_chat_templates_and_the_mask_is_exact(family, messages):
    tok, hf, end_of_turn, _ = family
    ids, mask = render(messages, tok)
    assert len(ids) == len(mask)
    assert ids[:-1] == hf_ids(hf, messages)  # then the document separator, not learned
    assert ids[-1] == tok.eot_id and mask[-1] == 0
    # exactly each assistant message (as the template writes it) and its end of turn
    content = str.strip if end_of_turn == "<|eot_id|>" else str  # Llama 3 trims content
    expected = [
        hf(content(m["content"]) + end_of_turn, add_special_tokens=False)["input_ids"]
        for m in messages
        if m["role"] == "assistant"
    ]
    assert runs(ids, mask) == expected
    assert sum(mask) == sum(len(r) for r in expected)


def test_the_prompt_is_the_generation_prompt_and_stops_at_the_end_of_turn(family):
    tok, hf, end_of_turn, _ = family
    messages = CONVERSATIONS[0]
    for k in (1, 2, 4):  # after system, after a user turn, mid-conversation
        assert render_prompt(messages[:k], tok) == hf_ids(hf, messages[:k], True)
    ids, stop = prompt_ids(tok, "Hello there!", chat=True)
    assert ids == hf_ids(hf, [{"role": "user", "content": "Hello there!"}], True)
    assert stop == hf.convert_tokens_to_ids(end_of_turn)


def test_prepare_chat_keeps_the_models_template_and_vocabulary(family, tmp_path):
    tok, _, end_of_turn, tok_dir = family
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS))
    out = tmp_path / "sft"
    meta = prepare_chat([str(src)], out, tokenizer=str(tok_dir), val_fraction=0.0, progress=False)
    assert meta["vocab_size"] == tok.vocab_size  # no dsfm chat tokens added
    assert meta["chat_template"].startswith("jinja-") and meta["chat_tokens"] == {}
    assert meta["end_of_turn"] == tok.hf_tokenizer.token_to_id(end_of_turn)
    meta = read_meta(out)
    tokens = np.fromfile(out / "train.bin", dtype=np.dtype(meta["dtype"])).tolist()
    mask = np.fromfile(out / "train.mask", dtype=np.uint8).tolist()
    rendered = [render(m, tok) for m in CONVERSATIONS]
    assert sorted(map(tuple, runs(tokens, mask))) == sorted(
        tuple(r) for ids, m in rendered for r in runs(ids, m)
    )
    assert sorted(tokens) == sorted(i for ids, _ in rendered for i in ids)
    assert Tokenizer.load(out).chat_template == tok.chat_template  # kept for generation


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    tok_dir = families.qwen2(tmp_path / "tok")
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    # like templates that drop the reasoning of all but the last assistant turn
    config["chat_template"] = (
        "{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' }}"
        "{% if m.role == 'assistant' and not loop.last %}{{ m.content[:3] }}"
        "{% else %}{{ m.content }}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="message 3 as an extension.*loss mask cannot be exact"):
        render(CONVERSATIONS[0], Tokenizer.load(tok_dir))


def test_a_template_ending_turns_with_the_end_of_text_is_refused(tmp_path):
    tok_dir = families.mistral(tmp_path / "tok")
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}"
        "{{ '[INST] ' + m.content + ' [/INST]' }}{% else %}{{ m.content + eos_token }}{% endif %}"
        "{% endfor %}"
    )
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps({"messages": CONVERSATIONS[1]}) + "\n")
    with pytest.raises(ValueError, match="ends turns with '</s>'.*also its end-of-text"):
        prepare_chat([str(src)], tmp_path / "out", tokenizer=str(tok_dir), progress=False)
