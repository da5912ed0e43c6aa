"""`dsfm export RUN --adapter`: PEFT loads the adapter onto the exported base model and
computes what dsfm's merged model computes, with and without a grown vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsfm.config.load import load_config, to_dict
from dsfm.data.corpus import stdlib_documents
from dsfm.data.tokenizer import Tokenizer, train_bpe
from dsfm.interop.hf import export_adapter, export_hf
from dsfm.interop.weights import load_model, save_plain
from dsfm.model.gpt import GPT
from dsfm.model.lora import apply_lora
from dsfm.train import checkpoint

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

NEW_TOKENS = ["<|user|>", "<|assistant|>"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> tuple[Path, Path]:
    """The base's tokenizer, and the run's: the same plus two chat tokens."""
    tok = train_bpe(list(stdlib_documents(max_bytes=50_000)), 300)
    base = tok.save(tmp_path_factory.mktemp("base_tok"))
    tok.hf_tokenizer.add_special_tokens(NEW_TOKENS)
    return base, tok.save(tmp_path_factory.mktemp("run_tok"))


def model_config(family: str, tie: bool, vocab: int, extra: list[str] = ()):
    cfg = load_config(
        None,
        [
            "model.d_model=64",
            "model.n_layers=2",
            "model.n_heads=4",
            "model.n_kv_heads=2",
            "model.ffn_hidden=96",
            "model.max_seq_len=64",
            f"model.family={family}",
            f"model.tie_embeddings={str(tie).lower()}",
            "train.seq_len=32",
            *extra,
        ],
    )
    cfg.model.vocab_size = vocab
    return cfg


def make_run(root: Path, tokenizers, family: str, tie: bool, grown: bool) -> tuple[Path, Path]:
    """A base plain checkpoint and a LoRA 'run' from it (a plain checkpoint holding adapters,
    as a ZeRO tag's consolidated weights do), both with varied random weights."""
    base_tok, run_tok = tokenizers
    vocab = Tokenizer.load(base_tok).vocab_size
    cfg = model_config(family, tie, vocab)
    torch.manual_seed(0)
    model = GPT(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    base = save_plain(root / "base", model.state_dict(), {"config": to_dict(cfg)}, base_tok)

    run_vocab = vocab + len(NEW_TOKENS) if grown else vocab
    lora = ["lora.rank=4", "lora.alpha=8", "lora.targets=[q_proj,v_proj,o_proj,down_proj]"]
    run_cfg = model_config(family, tie, run_vocab, [*lora, f"train.init_from={base}"])
    run_model = GPT(run_cfg.model)
    sd = model.state_dict()
    with torch.no_grad():
        for name, p in run_model.named_parameters():
            p[: len(sd[name])].copy_(sd[name])
            p[len(sd[name]) :].normal_(0, 0.2)  # the new tokens' rows, trained in the run
        if grown:  # embedding and head train in full when the vocabulary grew
            run_model.embed_tokens.weight.add_(0.01 * torch.randn_like(run_model.lm_head.weight))
    apply_lora(run_model, rank=4, alpha=8, targets=run_cfg.lora.targets)
    with torch.no_grad():
        for name, p in run_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    tok = run_tok if grown else base_tok
    run = save_plain(root / "run", run_model.state_dict(), {"config": to_dict(run_cfg)}, tok)
    return base, run


@pytest.mark.parametrize(
    ("family", "tie", "grown"),
    [("llama", False, False), ("qwen2", False, True), ("llama", True, True)],
)
def test_peft_adapter_on_exported_base_matches_dsfm_merged(
    tmp_path, tokenizers, family, tie, grown
):
    base, run = make_run(tmp_path, tokenizers, family, tie, grown)
    base_hf = export_hf(base, tmp_path / "base_hf", dtype="fp32")
    adapter = export_adapter(run, tmp_path / "adapter", dtype="fp32")

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    assert config["target_modules"] == ["down_proj", "o_proj", "q_proj", "v_proj"]
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in keys
    assert ("base_model.model.model.embed_tokens.weight" in keys) is grown
    assert ("base_model.model.lm_head.weight" in keys) is (grown and not tie)

    merged, tok = load_model(run)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_hf, dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(adapter)
    if grown:  # PEFT's path for added tokens: size the base to the tokenizer, then load
        hf.resize_token_embeddings(len(hf_tok))
    model = peft.PeftModel.from_pretrained(hf, adapter).eval()
    ids = torch.randint(
        0, merged.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, merged(ids), rtol=0, atol=1e-5)
        with model.disable_adapter():  # not vacuous: the base alone computes otherwise
            assert (model(input_ids=ids).logits - merged(ids)).abs().max() > 1e-2
    assert hf_tok("hello world", add_special_tokens=False)["input_ids"] == tok.encode("hello world")
    if grown:  # the adapter directory carries the run's tokenizer, chat tokens included
        ours = [tok.hf_tokenizer.token_to_id(t) for t in NEW_TOKENS]
        assert hf_tok.convert_tokens_to_ids(NEW_TOKENS) == ours


def test_adapter_refused_without_lora_and_with_an_unreadable_base(tmp_path, tokenizers):
    base, run = make_run(tmp_path, tokenizers, "llama", False, False)
    with pytest.raises(ValueError, match=r"no LoRA adapters.*without --adapter"):
        export_adapter(base, tmp_path / "out")
    state_file = next(run.glob("dsfm_state.json"))
    state = json.loads(state_file.read_text())
    state["config"]["train"]["init_from"] = str(tmp_path / "gone")
    state_file.write_text(json.dumps(state))
    checkpoint.write_manifest(run)  # an edited tag, not a damaged one
    with pytest.raises(FileNotFoundError, match=r"started from .*gone.*cannot be read"):
        export_adapter(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()
