"""An imported Qwen2 (q/k/v biases) fine-tunes in full under real DeepSpeed ZeRO-3 (one
process: the partitioned build, fill and save paths) and exports back as a Qwen2 that
transformers computes the same logits with."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.conftest import dsfm, read_metrics

transformers = pytest.importorskip("transformers")


def test_imported_qwen2_finetunes_under_zero3_and_exports_as_qwen2(bpe_data, tmp_path):
    from dsfm.data.tokenizer import Tokenizer
    from dsfm.interop.weights import load_model

    tok = Tokenizer.load(bpe_data)
    cfg = transformers.Qwen2Config(
        vocab_size=tok.vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(cfg)
    hf.save_pretrained(tmp_path / "hf")
    shutil.copy(bpe_data / "tokenizer.json", tmp_path / "hf" / "tokenizer.json")
    dsfm("import", str(tmp_path / "hf"), "--out", str(tmp_path / "imported"))

    run = tmp_path / "run"
    dsfm(
        "finetune",
        "--ds",
        "ds_configs/zero3.json",
        f"data.path={bpe_data}",
        f"train.init_from={tmp_path / 'imported'}",
        f"train.out_dir={run}",
        "lora.rank=0",
        "train.seq_len=32",
        "train.micro_batch_size=4",
        "train.max_steps=3",
        "schedule.warmup_steps=1",
        "optim.lr=1e-2",
        "eval.every=0",
        "checkpoint.every=0",
    )
    assert len([r for r in read_metrics(run) if "loss" in r]) == 3
    ours, _ = load_model(run)
    assert ours.cfg.family == "qwen2"
    bias = ours.layers[0].self_attn.q_proj.bias
    assert bias.abs().max() > 0  # the biases (zero in the import) trained

    dsfm("export", str(run), "--out", str(tmp_path / "out"), "--dtype", "fp32")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert isinstance(again, transformers.Qwen2ForCausalLM)
    ids = torch.tensor([tok.encode("import os\nprint(os.getcwd())")])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ours(ids), atol=1e-5, rtol=1e-5)
