"""Hugging Face export/import: transformers loads our exports and computes the same logits,
AutoTokenizer gives our ids, sharding and bf16 work, imports round-trip, bad inputs fail clearly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dsfm.config.load import load_config, to_dict
from dsfm.data.corpus import stdlib_documents
from dsfm.data.tokenizer import EOT, Tokenizer, train_bpe
from dsfm.interop.hf import config_from_hf, export_hf, import_hf
from dsfm.interop.weights import load_model, load_weights, save_plain
from dsfm.model.gpt import GPT
from dsfm.train import checkpoint

transformers = pytest.importorskip("transformers")

CHAT_TOKEN = "<|user|>"
TEXTS = [
    "def f(x):\n    return {'a': x ** 2}  # squared\n",
    "héllo wörld — naïve café, 日本語のテキスト 🚀🎉",
    "  leading\tand  trailing   spaces \n\n\n\r\n",
    "class A:\n\tpass\n\n\nif __name__ == '__main__':\n    A()",
]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    """A 512-token byte-level BPE plus one chat special token (as fine-tuning adds)."""
    tok = train_bpe(list(stdlib_documents(max_bytes=200_000)) + TEXTS, 512)
    tok.hf_tokenizer.add_special_tokens([CHAT_TOKEN])
    return tok.save(tmp_path_factory.mktemp("tok"))


def make_plain(
    out: Path, tokenizer_path: Path, *, tie: bool = False, n_kv_heads: int = 4, seed: int = 0
) -> Path:
    """A plain checkpoint of a tiny GPT with weights large enough to give varied logits."""
    cfg = load_config(
        None,
        [
            "model.d_model=64",
            "model.n_layers=2",
            "model.n_heads=4",
            f"model.n_kv_heads={n_kv_heads}",
            "model.ffn_hidden=96",
            "model.max_seq_len=64",
            "model.rope_theta=500000.0",
            "model.norm_eps=1e-6",
            f"model.tie_embeddings={str(tie).lower()}",
            "train.seq_len=32",
        ],
    )
    # Three padding rows beyond the tokenizer, as a vocabulary rounded up would have.
    cfg.model.vocab_size = Tokenizer.load(tokenizer_path).vocab_size + 3
    torch.manual_seed(seed)
    model = GPT(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return save_plain(out, model.state_dict(), {"config": to_dict(cfg)}, tokenizer_path)


def ids_for(model: GPT, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.vocab_size, (2, 40), generator=g)


def hf_logits(hf_dir: Path, ids: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.nn.Module]:
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, **kwargs).eval()
    with torch.no_grad():
        return hf(input_ids=ids).logits, hf


@pytest.mark.parametrize(("tie", "n_kv_heads"), [(False, 4), (True, 4), (False, 2), (True, 2)])
def test_export_fp32_matches_hf_logits(tmp_path, tokenizer_path, tie, n_kv_heads):
    plain = make_plain(tmp_path / "plain", tokenizer_path, tie=tie, n_kv_heads=n_kv_heads)
    out = export_hf(plain, tmp_path / "hf", dtype="fp32")
    assert (out / "model.safetensors").is_file()
    assert not (out / "model.safetensors.index.json").exists()
    ours, _ = load_model(plain)
    ids = ids_for(ours)
    ref, hf = hf_logits(out, ids)
    assert next(hf.parameters()).dtype == torch.float32  # config.json's torch_dtype was read
    assert hf.config.tie_word_embeddings is tie and hf.config.num_key_value_heads == n_kv_heads
    if tie:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        got = ours(ids)
    torch.testing.assert_close(ref, got, rtol=0, atol=1e-5)


def test_exported_tokenizer_gives_our_ids(tmp_path, tokenizer_path):
    plain = make_plain(tmp_path / "plain", tokenizer_path)
    out = export_hf(plain, tmp_path / "hf", dtype="fp32")
    ours = Tokenizer.load(tokenizer_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        ids = hf_tok(text)["input_ids"]  # default call: no BOS/EOS may be added
        assert ids == ours.encode(text), text
        assert hf_tok.decode(ids) == text
    assert hf_tok.eos_token == hf_tok.bos_token == hf_tok.pad_token == EOT
    assert hf_tok.eos_token_id == ours.eot_id
    chat_id = ours.hf_tokenizer.token_to_id(CHAT_TOKEN)
    assert hf_tok.convert_tokens_to_ids(CHAT_TOKEN) == chat_id
    assert CHAT_TOKEN in hf_tok.all_special_tokens
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert gen.eos_token_id == gen.bos_token_id == ours.eot_id
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == ours.eot_id and config["architectures"] == ["LlamaForCausalLM"]


def test_sharded_export_loads_and_matches(tmp_path, tokenizer_path):
    plain = make_plain(tmp_path / "plain", tokenizer_path, n_kv_heads=2)
    out = export_hf(plain, tmp_path / "hf", dtype="fp32", max_shard_bytes=40_000)
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert "model.layers.1.mlp.down_proj.weight" in index["weight_map"]
    ours, _ = load_model(plain)
    assert index["metadata"]["total_size"] == 4 * ours.num_params()
    ids = ids_for(ours)
    ref, _ = hf_logits(out, ids)
    with torch.no_grad():
        torch.testing.assert_close(ref, ours(ids), rtol=0, atol=1e-5)


def test_bf16_export_loads_and_is_close(tmp_path, tokenizer_path):
    plain = make_plain(tmp_path / "plain", tokenizer_path, tie=True, n_kv_heads=2)
    out = export_hf(plain, tmp_path / "hf")  # bf16 is the default
    ours, _ = load_model(plain)
    ids = ids_for(ours)
    ref, hf = hf_logits(out, ids)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert next(hf.parameters()).dtype == torch.bfloat16
    # The weights are exactly ours rounded to bf16 ...
    hf_sd = hf.state_dict()
    for name, w in ours.state_dict().items():
        hf_name = name if name.startswith("lm_head") else f"model.{name}"
        assert torch.equal(hf_sd[hf_name], w.to(torch.bfloat16)), name
    # ... and the logits of a bf16 forward stay close to the fp32 ones.
    with torch.no_grad():
        got = ours(ids)
    err = (ref.float() - got).abs().mean() / got.abs().mean()
    assert err < 0.05, err


def test_lora_weights_refused(tmp_path, tokenizer_path):
    plain = make_plain(tmp_path / "plain", tokenizer_path)
    state = checkpoint.client_state(*checkpoint.resolve(plain))
    sd = load_weights(*checkpoint.resolve(plain), state)
    sd["layers.0.self_attn.q_proj.lora_A"] = torch.zeros(4, 64)
    sd["layers.0.self_attn.q_proj.lora_B"] = torch.zeros(64, 4)
    lora = save_plain(tmp_path / "lora", sd, state, tokenizer_path)
    with pytest.raises(ValueError, match=r"LoRA.*dsfm merge"):
        export_hf(lora, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".hf")] == []


def test_bad_arguments_refused(tmp_path, tokenizer_path):
    plain = make_plain(tmp_path / "plain", tokenizer_path)
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        export_hf(plain, tmp_path / "taken")
    with pytest.raises(ValueError, match="dtype must be one of bf16, fp32"):
        export_hf(plain, tmp_path / "hf", dtype="fp16")
    assert not (tmp_path / "hf").exists()


# --- import ---------------------------------------------------------------------------


def save_hf_llama(
    out: Path, vocab_size: int, tokenizer_file: Path, *, tie: bool = False
) -> torch.nn.Module:
    hf_cfg = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        rope_theta=250000.0,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    hf.save_pretrained(out)
    shutil.copyfile(tokenizer_file, out / "tokenizer.json")
    return hf


@pytest.mark.parametrize("tie", [False, True])
def test_import_matches_hf_logits(tmp_path, tokenizer_path, tie):
    vocab = Tokenizer.load(tokenizer_path).vocab_size
    hf = save_hf_llama(tmp_path / "hf", vocab, tokenizer_path, tie=tie)
    plain = import_hf(tmp_path / "hf", tmp_path / "plain")
    ours, tok = load_model(plain)
    assert ours.cfg.rope_theta == 250000.0 and ours.cfg.n_kv_heads == 2
    assert ours.cfg.tie_embeddings is tie and ours.cfg.vocab_size == vocab
    assert (plain / "tokenizer.json").read_bytes() == tokenizer_path.read_bytes()
    ids = ids_for(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_export_then_import_round_trips(tmp_path, tokenizer_path):
    plain = make_plain(tmp_path / "plain", tokenizer_path, tie=True, n_kv_heads=2)
    export_hf(plain, tmp_path / "hf", dtype="fp32", max_shard_bytes=100_000)
    back = import_hf(tmp_path / "hf", tmp_path / "back")
    a = load_model(plain)[0].state_dict()
    b = load_model(back)[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg_a = checkpoint.client_state(*checkpoint.resolve(plain))["config"]["model"]
    cfg_b = checkpoint.client_state(*checkpoint.resolve(back))["config"]["model"]
    assert cfg_a == cfg_b


def test_import_adds_missing_eot(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    foreign = HFTokenizer(models.BPE())
    foreign.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    foreign.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    foreign.train_from_iterator(TEXTS * 10, trainer=trainer)
    foreign.save(str(tmp_path / "foreign.json"))
    vocab = foreign.get_vocab_size(with_added_tokens=True)
    hf = save_hf_llama(tmp_path / "hf", vocab, tmp_path / "foreign.json")

    plain = import_hf(tmp_path / "hf", tmp_path / "plain")
    ours, tok = load_model(plain)
    assert tok.eot_id == vocab and ours.cfg.vocab_size == vocab + 1  # one row grown for EOT
    assert tok.encode(TEXTS[1]) == foreign.encode(TEXTS[1]).ids  # other ids unchanged
    ids = ids_for(ours) % vocab
    with torch.no_grad():
        torch.testing.assert_close(
            ours(ids)[..., :vocab], hf(input_ids=ids).logits, rtol=0, atol=1e-5
        )
    assert checkpoint.client_state(*checkpoint.resolve(plain))["added_tokens"] == [EOT]


BASE_HF = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "yarn"),
        ({"model_type": "gemma"}, "model_type"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"head_dim": 32}, "head_dim"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_unsupported_hf_config_refused(edit, field):
    assert config_from_hf(BASE_HF)["model"]["d_model"] == 64
    with pytest.raises(ValueError, match=field):
        config_from_hf({**BASE_HF, **edit})


def test_import_refuses_rope_scaling_and_missing_tokenizer(tmp_path, tokenizer_path):
    save_hf_llama(tmp_path / "hf", Tokenizer.load(tokenizer_path).vocab_size, tokenizer_path)
    config_file = tmp_path / "hf" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "rope_scaling": {"type": "dynamic", "factor": 4}}))
    with pytest.raises(ValueError, match="unsupported Hugging Face config: RoPE scaling type"):
        import_hf(tmp_path / "hf", tmp_path / "plain")
    (tmp_path / "hf" / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        import_hf(tmp_path / "hf", tmp_path / "plain")
    assert not (tmp_path / "plain").exists()
