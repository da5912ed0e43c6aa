"""Chat models out: an exported chat model's tokenizer renders dsfm's template (or the model's
own) with transformers' `apply_chat_template` to the ids dsfm trained on, and transformers'
`generate` stops at the end of an assistant turn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsfm.config.load import load_config, to_dict
from dsfm.data.chat import END, add_chat_tokens, end_of_turn_id, render, render_prompt
from dsfm.data.corpus import stdlib_documents
from dsfm.data.tokenizer import EOT, Tokenizer, train_bpe
from dsfm.interop.hf import export_hf
from dsfm.interop.weights import save_plain
from tests import family_tokenizers as families

transformers = pytest.importorskip("transformers")

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "def f(x):\n    return x ** 2"},
    {"role": "assistant", "content": "It squares x."},
    {"role": "user", "content": "  héllo wörld 🚀 "},  # 2 spaces: BPE merges "\n "
    {"role": "assistant", "content": "\nHello!\n\nAnything else?"},
    {"role": "user", "content": "No, thanks."},
    {"role": "assistant", "content": "Bye."},
]


def plain_checkpoint(out: Path, tok: Tokenizer, weights=None) -> Path:
    """A plain checkpoint of a tiny GPT at `tok`'s vocabulary (random weights unless given)."""
    from dsfm.model.gpt import GPT

    tok_dir = out.parent / (out.name + "-tok")
    tok.save(tok_dir)
    cfg = load_config(
        None,
        ["model.d_model=64", "model.n_layers=1", "model.n_heads=4", "model.n_kv_heads=4"]
        + ["model.max_seq_len=64", "train.seq_len=32", f"model.vocab_size={tok.vocab_size}"],
    )
    torch.manual_seed(0)
    model = GPT(cfg.model)
    state = model.state_dict() if weights is None else weights(model.state_dict())
    return save_plain(out, state, {"config": to_dict(cfg)}, tok_dir)


@pytest.fixture(scope="module")
def dsfm_chat_tokenizer() -> Tokenizer:
    """dsfm's BPE with the chat tokens a `prepare --chat` adds."""
    return add_chat_tokens(train_bpe(stdlib_documents(max_bytes=100_000), 400))


def exported(tmp_path: Path, tok: Tokenizer, weights=None) -> Path:
    return export_hf(
        plain_checkpoint(tmp_path / "plain", tok, weights), tmp_path / "hf", dtype="fp32"
    )


def hf_ids(hf_tok, messages, add_generation_prompt=False) -> list[int]:
    return list(
        hf_tok.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
        )
    )


def check_renders_like_dsfm(hf_dir: Path, tok: Tokenizer) -> None:
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids, _ = render(CONVERSATION, tok)
    n = len(hf_ids(hf_tok, CONVERSATION))
    assert hf_ids(hf_tok, CONVERSATION) == ids[:n] and ids[n:] in ([], [tok.eot_id])
    for k in range(1, len(CONVERSATION)):  # every point a reply can be asked for
        assert hf_ids(hf_tok, CONVERSATION[:k], True) == render_prompt(CONVERSATION[:k], tok)


def test_dsfm_template_exports_as_jinja_with_the_end_of_turn_as_eos(tmp_path, dsfm_chat_tokenizer):
    tok = dsfm_chat_tokenizer
    hf_dir = exported(tmp_path, tok)
    check_renders_like_dsfm(hf_dir, tok)
    ids, _ = render(CONVERSATION, tok)
    assert hf_ids(transformers.AutoTokenizer.from_pretrained(hf_dir), CONVERSATION) == ids
    end, eot = tok.hf_tokenizer.token_to_id(END), tok.eot_id
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert config["eos_token"] == END and config["pad_token"] == EOT
    for name in ("generation_config.json", "config.json"):
        assert json.loads((hf_dir / name).read_text())["eos_token_id"] == [eot, end]


def test_a_bos_family_with_dsfms_template_exports_its_bos(tmp_path):
    """Llama 3 base + dsfm's template: BOS starts each conversation, in dsfm and in HF."""
    tok = add_chat_tokens(Tokenizer.load(families.llama3(tmp_path / "tok", instruct=False)))
    ids, mask = render(CONVERSATION, tok)
    assert ids[0] == tok.bos_id and mask[0] == 0 and ids[-1] == tok.eot_id
    check_renders_like_dsfm(exported(tmp_path, tok), tok)


def test_a_models_own_template_goes_back_out(tmp_path):
    tok = Tokenizer.load(families.qwen2(tmp_path / "tok"))
    hf_dir = exported(tmp_path, tok)
    check_renders_like_dsfm(hf_dir, tok)
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == families.QWEN_TEMPLATE and config["bos_token"] is None
    im_end, endoftext = (tok.hf_tokenizer.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>"))
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [endoftext, im_end]
    assert generation["pad_token_id"] == endoftext and generation["bos_token_id"] is None


def test_transformers_generate_stops_at_the_end_of_the_turn(tmp_path, dsfm_chat_tokenizer):
    """Weights set so greedy decoding after the prompt says "H", "i", END and then, if not
    stopped, goes on with "X": transformers' own generate must stop at END."""
    tok = dsfm_chat_tokenizer
    prompt = render_prompt([{"role": "user", "content": "Hello"}], tok)
    h, i, x = (tok.encode(c)[0] for c in "HiX")
    end = end_of_turn_id(tok)
    chain = [prompt[-1], h, i, end, x]  # each token's successor is the next one

    def weights(state):
        state = {k: torch.zeros_like(v) for k, v in state.items()}  # layers add nothing
        for name in ("norm.weight", "layers.0.input_layernorm.weight"):
            state[name] = torch.ones_like(state[name])
        state["layers.0.post_attention_layernorm.weight"] = torch.ones(64)
        for k, (token, successor) in enumerate(zip(chain, chain[1:])):
            state["embed_tokens.weight"][token, k] = 1.0
            state["lm_head.weight"][successor, k] = 10.0
        return state

    hf_dir = exported(tmp_path, tok, weights)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)  # generation_config's eos
        assert out[0, len(prompt) :].tolist() == [h, i, end]
        # the weights do go on past END when END is not an eos: the stop above was END's
        on = model.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=tok.eot_id)
        assert on[0, len(prompt) :].tolist()[:4] == [h, i, end, x]


def test_an_imported_instruct_model_fine_tunes_with_its_own_template(tmp_path):
    """`dsfm import` of a Llama 3 Instruct style model keeps its tokenizer's roles and
    template (no token added), and `prepare --chat` from the checkpoint renders with it."""
    from dsfm.data.prepare import prepare_chat
    from dsfm.interop.hf import import_hf
    from dsfm.train import checkpoint

    src = families.llama3(tmp_path / "hf")
    vocab = Tokenizer.load(src).vocab_size
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(src)
    plain = import_hf(src, tmp_path / "plain")
    tok = Tokenizer.load(plain)
    assert tok.vocab_size == vocab and tok.chat_template == families.LLAMA3_TEMPLATE
    assert "added_tokens" not in checkpoint.client_state(*checkpoint.resolve(plain))
    chats = tmp_path / "chat.jsonl"
    chats.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    meta = prepare_chat([str(chats)], tmp_path / "sft", tokenizer=str(plain), progress=False)
    assert meta["vocab_size"] == vocab and meta["chat_template"].startswith("jinja-")
    assert meta["end_of_turn"] == tok.hf_tokenizer.token_to_id("<|eot_id|>")
    hf_tok = transformers.AutoTokenizer.from_pretrained(src)
    assert render(CONVERSATION, Tokenizer.load(tmp_path / "sft"))[0][:-1] == hf_ids(
        hf_tok, CONVERSATION
    )
