"""Real architectures in and out: tiny random Llama (llama3 and linear RoPE scaling), Qwen2
(q/k/v biases) and Mistral (sliding window) models made by transformers are imported with
the same logits, and export back as the same architecture with the same logits; a hub id
is read from the Hugging Face cache offline; what we cannot compute is refused clearly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dsfm.config.load import from_dict
from dsfm.data.corpus import stdlib_documents
from dsfm.data.tokenizer import Tokenizer, train_bpe
from dsfm.eval.generate import sample
from dsfm.interop.hf import config_from_hf, export_hf, import_hf
from dsfm.interop.weights import load_model
from dsfm.model import sizes
from dsfm.train import checkpoint

transformers = pytest.importorskip("transformers")

SIZES = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
)
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # small, so that 64 positions cross all three frequency bands
    "original_max_position_embeddings": 16,
}


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    tok = train_bpe(list(stdlib_documents(max_bytes=50_000)), 300)
    return tok.save(tmp_path_factory.mktemp("tok"))


def hf_config(family: str, vocab: int, **extra):
    if family == "llama":
        return transformers.LlamaConfig(vocab_size=vocab, **SIZES, **extra)
    if family == "qwen2":
        return transformers.Qwen2Config(vocab_size=vocab, **SIZES, **extra)
    return transformers.MistralConfig(vocab_size=vocab, **SIZES, **extra)


def save_hf(out: Path, cfg, tokenizer_path: Path) -> torch.nn.Module:
    """A transformers model with weights (biases included) large enough for varied logits,
    saved as safetensors with our tokenizer."""
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    hf.save_pretrained(out, safe_serialization=True)
    shutil.copyfile(tokenizer_path, out / "tokenizer.json")
    return hf


def random_ids(vocab: int, length: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(1))


CASES = {
    "llama-rope-llama3": ("llama", {"rope_scaling": LLAMA3, "rope_theta": 500000.0}),
    "llama-rope-linear": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "smollm2-like-tied": ("llama", {"tie_word_embeddings": True, "rope_theta": 100000.0}),
    "qwen2": ("qwen2", {"rope_theta": 1000000.0}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
    "mistral": ("mistral", {"sliding_window": None}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_and_export_keep_logits_and_architecture(tmp_path, tokenizer_path, case):
    family, extra = CASES[case]
    vocab = Tokenizer.load(tokenizer_path).vocab_size
    hf = save_hf(tmp_path / "hf", hf_config(family, vocab, **extra), tokenizer_path)
    ids = random_ids(vocab)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits

    plain = import_hf(tmp_path / "hf", tmp_path / "plain")
    ours, _ = load_model(plain)
    assert ours.cfg.family == family
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())  # biases included
    assert sizes.num_params(ours.cfg) == ours.num_params()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref, rtol=0, atol=1e-5)
    # Sampling goes through the KV cache (positions offset by the cache): greedy agrees.
    prompt = ids[0, :8].tolist()
    theirs = hf.generate(
        ids[:1, :8], max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, 8:].tolist()
    assert sample(ours, prompt, max_new_tokens=12, temperature=0) == theirs

    out = export_hf(plain, tmp_path / "export", dtype="fp32")
    config = json.loads((out / "config.json").read_text())
    original = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == original["model_type"] == family
    assert config["architectures"] == original["architectures"]
    again = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(again) is type(hf)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, ref, rtol=0, atol=1e-5)


def test_rope_scaling_changes_the_model(tmp_path, tokenizer_path):
    """The llama3 case above is not vacuous: without the scaling the logits differ."""
    vocab = Tokenizer.load(tokenizer_path).vocab_size
    hf = save_hf(tmp_path / "hf", hf_config("llama", vocab, rope_scaling=LLAMA3), tokenizer_path)
    plain = import_hf(tmp_path / "hf", tmp_path / "plain")
    ours, _ = load_model(plain)
    ids = random_ids(vocab)
    ours.cfg.rope_scaling = None
    with torch.no_grad():
        assert (ours(ids) - hf(input_ids=ids).logits).abs().max() > 1e-2


def test_mistral_sliding_window_caps_the_context(tmp_path, tokenizer_path):
    vocab = Tokenizer.load(tokenizer_path).vocab_size
    hf = save_hf(tmp_path / "hf", hf_config("mistral", vocab, sliding_window=32), tokenizer_path)
    plain = import_hf(tmp_path / "hf", tmp_path / "plain")
    ours, _ = load_model(plain)
    assert ours.cfg.max_seq_len == 32
    state = checkpoint.client_state(*checkpoint.resolve(plain))
    assert "sliding attention window" in state["notes"][0]
    assert state["config"]["train"]["seq_len"] <= 32
    ids = random_ids(vocab, 32)  # within the window: the same computation
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="exceeds max_seq_len=32"):
        ours(random_ids(vocab, 33))
    # Training longer than the window is refused with the fix, before any work.
    config = state["config"]
    config["train"]["seq_len"] = 64
    with pytest.raises(ValueError, match="train.seq_len=64 exceeds model.max_seq_len=32"):
        from_dict(config)


def test_hub_id_imports_from_the_cache_offline(tmp_path, tokenizer_path, monkeypatch):
    root = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    rev = "0" * 40
    repo = root / "models--org--tiny-qwen"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    vocab = Tokenizer.load(tokenizer_path).vocab_size
    hf = save_hf(repo / "snapshots" / rev, hf_config("qwen2", vocab), tokenizer_path)

    plain = import_hf("org/tiny-qwen", tmp_path / "plain")
    ours, _ = load_model(plain)
    ids = random_ids(vocab)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"org/missing.*not in the Hugging Face cache"):
        import_hf("org/missing", tmp_path / "other")
    assert not (tmp_path / "other").exists()


BASE = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 300,
    **SIZES,
}


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        ({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]}, "'mixtral'"),
        ({"model_type": "qwen2", "architectures": ["Qwen2MoeForCausalLM"]}, "Qwen2ForCausalLM"),
        ({"num_local_experts": 8}, "mixture of experts"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "RoPE scaling type 'dynamic'"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling type 'yarn'"),
        ({"attention_bias": True}, "attention_bias"),
    ],
)
def test_unsupported_configs_list_what_is_supported(edit, field):
    with pytest.raises(ValueError, match=field) as err:
        config_from_hf({**BASE, **edit})
    assert "supported: model_type llama" in str(err.value) and "qwen2" in str(err.value)


def _published(model_type: str, arch: str, **fields) -> dict:
    common = {"model_type": model_type, "architectures": [arch], "hidden_act": "silu"}
    return {**common, "torch_dtype": "bfloat16", "use_cache": True, **fields}


# The config.json fields of four hub models as published (transformers 4.x spelling), and
# their parameter counts as the hub's safetensors metadata states them.
PUBLISHED = {
    "Qwen/Qwen2.5-0.5B": (
        _published(
            "qwen2",
            "Qwen2ForCausalLM",
            hidden_size=896,
            intermediate_size=4864,
            num_attention_heads=14,
            num_hidden_layers=24,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            max_window_layers=24,
            rms_norm_eps=1e-06,
            rope_theta=1000000.0,
            sliding_window=32768,
            use_sliding_window=False,
            tie_word_embeddings=True,
            vocab_size=151936,
        ),
        494_032_768,
    ),
    "meta-llama/Llama-3.2-1B": (
        _published(
            "llama",
            "LlamaForCausalLM",
            attention_bias=False,
            mlp_bias=False,
            head_dim=64,
            hidden_size=2048,
            intermediate_size=8192,
            num_attention_heads=32,
            num_hidden_layers=16,
            num_key_value_heads=8,
            max_position_embeddings=131072,
            rms_norm_eps=1e-05,
            rope_scaling={
                "factor": 32.0,
                "high_freq_factor": 4.0,
                "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3",
            },
            rope_theta=500000.0,
            tie_word_embeddings=True,
            vocab_size=128256,
        ),
        1_235_814_400,
    ),
    "mistralai/Mistral-7B-v0.1": (
        _published(
            "mistral",
            "MistralForCausalLM",
            hidden_size=4096,
            intermediate_size=14336,
            num_attention_heads=32,
            num_hidden_layers=32,
            num_key_value_heads=8,
            max_position_embeddings=32768,
            rms_norm_eps=1e-05,
            rope_theta=10000.0,
            sliding_window=4096,
            tie_word_embeddings=False,
            vocab_size=32000,
        ),
        7_241_732_096,
    ),
    "HuggingFaceTB/SmolLM2-135M": (
        _published(
            "llama",
            "LlamaForCausalLM",
            hidden_size=576,
            intermediate_size=1536,
            num_attention_heads=9,
            num_hidden_layers=30,
            num_key_value_heads=3,
            max_position_embeddings=8192,
            rms_norm_eps=1e-05,
            rope_scaling=None,
            rope_theta=100000,
            tie_word_embeddings=True,
            vocab_size=49152,
        ),
        134_515_008,
    ),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_configs_map_with_their_published_parameter_counts(name):
    """The mapping reads real-world config.json files, and `dsfm plan`'s counts (biases
    included) equal the published totals."""
    hf, params = PUBLISHED[name]
    cfg = from_dict(config_from_hf(hf)).model
    assert cfg.family == hf["model_type"] and sizes.num_params(cfg) == params
    assert cfg.rope_theta == hf["rope_theta"]
    if hf.get("rope_scaling"):
        assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_max_len) == (
            "llama3",
            32,
            8192,
        )
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    assert cfg.max_seq_len == min(hf["max_position_embeddings"], window or 10**9)
