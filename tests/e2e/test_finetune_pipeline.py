"""Pretrain -> instruction data -> LoRA SFT -> merge -> export -> transformers, end to end.

Real DeepSpeed ranks (ZeRO-3 pretraining, ZeRO-2 fine-tuning), real files, real tokenizers;
the chat set is made from Python's own documentation topics.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import TINY, deepspeed_train, dsfm, read_metrics

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.distributed


def chat_file(path, n: int = 80):
    from pydoc_data.topics import topics

    with open(path, "w") as f:
        for key in sorted(topics)[:n]:
            text = " ".join(topics[key].split())[:300]
            if key.startswith("a"):  # both record forms
                f.write(json.dumps({"prompt": f"Explain {key}.", "response": text}) + "\n")
            else:
                messages = [
                    {"role": "system", "content": "You answer questions about Python."},
                    {"role": "user", "content": f"What is {key}?"},
                    {"role": "assistant", "content": text},
                ]
                f.write(json.dumps({"messages": messages}) + "\n")
    return path


@pytest.fixture(scope="module")
def pipeline(bpe_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    base = root / "base"
    deepspeed_train(
        "zero3",
        [
            *TINY,
            f"data.path={bpe_data}",
            f"train.out_dir={base}",
            "train.max_steps=20",
            "eval.every=0",
            "checkpoint.every=0",
        ],
        port=29570,
    )
    chat = root / "chat"
    dsfm(
        "prepare",
        "--chat",
        "--input",
        str(chat_file(root / "chats.jsonl")),
        "--out",
        str(chat),
        "--tokenizer",
        str(base / "tokenizer.json"),
        "--val-fraction",
        "0.1",
    )
    sft = root / "sft"
    out = deepspeed_train(
        "zero2",
        [
            "--config",
            "configs/sft_lora.yaml",
            f"data.path={chat}",
            f"train.init_from={base}",
            f"train.out_dir={sft}",
            "train.seq_len=32",
            "train.micro_batch_size=4",
            "train.max_steps=12",
            "schedule.warmup_steps=2",
            "eval.every=6",
            "eval.batches=1",
            "eval.max_new_tokens=8",
            "checkpoint.every=6",
            "optim.lr=5e-3",
            "lora.dropout=0",
        ],
        port=29575,
        launcher="launchers/finetune.py",
    )
    return {"root": root, "base": base, "chat": chat, "sft": sft, "log": out.stdout}


def test_lora_sft_trains_adapters_and_learns(pipeline):
    rows = [r for r in read_metrics(pipeline["sft"]) if "loss" in r]
    assert len(rows) == 12 and rows[-1]["loss"] < rows[0]["loss"]
    assert "M trained)" in pipeline["log"]
    state = json.loads((pipeline["sft"] / "checkpoints" / "final" / "dsfm_state.json").read_text())
    assert state["config"]["lora"]["rank"] == 8
    assert state["config"]["model"]["vocab_size"] == 2048 + 4  # chat tokens: embeddings grew
    # Chat data trains document-masked by default, though the base (text data) did not.
    base = json.loads((pipeline["base"] / "checkpoints" / "final" / "dsfm_state.json").read_text())
    assert base["config"]["model"]["doc_mask"] is False
    assert state["config"]["model"]["doc_mask"] is True
    samples = (pipeline["sft"] / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 2 and json.loads(samples[0])["prompt"] == "What does the os module do?"


def test_merge_export_matches_transformers_and_generates(pipeline):
    from dsfm.config.load import from_dict
    from dsfm.data.tokenizer import Tokenizer
    from dsfm.eval.generate import sample
    from dsfm.interop.weights import load_into, load_model
    from dsfm.model.gpt import GPT
    from dsfm.model.lora import apply_lora
    from dsfm.train import checkpoint, engine

    root, sft = pipeline["root"], pipeline["sft"]
    dsfm("merge", str(sft), "--out", str(root / "merged"))
    dsfm("export", str(root / "merged"), "--out", str(root / "hf"), "--dtype", "fp32")

    # The unmerged LoRA model, built from the raw ZeRO-2 shards (adapters separate).
    state = checkpoint.client_state(sft / "checkpoints", "final")
    cfg = from_dict(state["config"])
    lora_model = GPT(cfg.model)
    apply_lora(
        lora_model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=0.0, targets=cfg.lora.targets
    )
    raw = engine.consolidated_state_dict(sft / "checkpoints", "final", 2)
    assert any(k.endswith("lora_B") for k in raw)
    load_into(lora_model, raw, sft)
    lora_model.eval()

    hf = transformers.AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32).eval()
    tok = Tokenizer.load(root / "hf")
    ids = torch.tensor([tok.encode("What is assert? The assert statement")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, lora_model(ids), atol=1e-4, rtol=1e-4)

    hf_tok = transformers.AutoTokenizer.from_pretrained(root / "hf")
    text = "def f(x):\n    return x  # café, 東京 and tabs\t\tend"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)

    # The chat template went out as Jinja: transformers renders dsfm's prompt ids, and
    # stops generating at the end of the assistant turn as well as at EOT.
    from dsfm.data.chat import END, render_prompt

    messages = [
        {"role": "system", "content": "You answer questions about Python."},
        {"role": "user", "content": "What is assert?"},
    ]
    dsfm_tok = Tokenizer.load(root / "merged")
    assert list(
        hf_tok.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=False
        )
    ) == render_prompt(messages, dsfm_tok)
    generation = json.loads((root / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tok.eot_id, tok.hf_tokenizer.token_to_id(END)]

    merged, _ = load_model(root / "merged")
    prompt = tok.encode("What is assert?")
    ours = sample(merged, prompt, max_new_tokens=12, temperature=0)
    theirs = hf.generate(
        torch.tensor([prompt]),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=tok.eot_id,
    )[0, len(prompt) :].tolist()
    assert len(ours) > 0 and ours == theirs[: len(ours)]
    reply = dsfm(
        "generate",
        str(root / "merged"),
        "--chat",
        "--prompt",
        "What is assert?",
        "--max-new-tokens",
        "16",
        "--temperature",
        "0",
    )
    assert reply.returncode == 0


def test_adapter_export_loads_in_peft_onto_the_exported_base(pipeline):
    """The LoRA run (ZeRO-2 shards, vocabulary grown by the chat tokens) as a PEFT adapter
    on the exported base computes what the merged model does."""
    peft = pytest.importorskip("peft")
    from dsfm.interop.weights import load_model

    root = pipeline["root"]
    dsfm("export", str(pipeline["base"]), "--out", str(root / "base_hf"), "--dtype", "fp32")
    adapter = root / "adapter"
    out = dsfm(
        "export", str(pipeline["sft"]), "--adapter", "--out", str(adapter), "--dtype", "fp32"
    )
    assert "PEFT LoRA adapter" in out.stdout
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["peft_type"] == "LORA"
    base = transformers.AutoModelForCausalLM.from_pretrained(root / "base_hf", dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(adapter)
    base.resize_token_embeddings(len(hf_tok))  # the run added chat tokens
    model = peft.PeftModel.from_pretrained(base, adapter).eval()
    merged, tok = load_model(pipeline["sft"])  # the run, adapters folded in
    ids = torch.tensor([tok.encode("What is assert? The assert statement")])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, merged(ids), atol=1e-5, rtol=1e-5)


def test_eval_and_import_round_trip(pipeline):
    root = pipeline["root"]
    if not (root / "hf").exists():
        pytest.skip("needs the export from the previous test")
    chat = str(pipeline["chat"])
    merged = json.loads(
        dsfm("eval", str(root / "merged"), "--data", chat, "--seq-len", "32", "--json").stdout
    )
    assert merged["loss"] > 0 and merged["bpb"] > 0 and merged["samples"] > 0
    unmerged = json.loads(
        dsfm("eval", str(pipeline["sft"]), "--data", chat, "--seq-len", "32", "--json").stdout
    )
    assert unmerged["loss"] == pytest.approx(merged["loss"], rel=1e-5)
    dsfm("import", str(root / "hf"), "--out", str(root / "imported"))
    # the imported checkpoint knows no training seq_len, hence the explicit --seq-len above
    imported = json.loads(
        dsfm("eval", str(root / "imported"), "--data", chat, "--seq-len", "32", "--json").stdout
    )
    assert imported["loss"] == pytest.approx(merged["loss"], rel=1e-5)


def test_full_finetune_from_imported_model_resumes_and_zero3_exports(pipeline):
    """Full fine-tuning (lora.rank=0) starting from `dsfm import` output, stopped and resumed;
    and an export straight from the ZeRO-3 pretraining shards matches in transformers."""
    from dsfm.interop.weights import load_model
    from dsfm.train import checkpoint

    root = pipeline["root"]
    imported = root / "imported"
    if not imported.exists():
        pytest.skip("needs the import from the previous test")
    run = root / "full"
    common = [
        "--config",
        "configs/sft_lora.yaml",
        f"data.path={pipeline['chat']}",
        f"train.init_from={imported}",
        f"train.out_dir={run}",
        "lora.rank=0",
        "train.seq_len=32",
        "train.micro_batch_size=4",
        "train.max_steps=4",
        "schedule.warmup_steps=1",
        "eval.every=0",
        "checkpoint.every=0",
    ]
    dsfm("finetune", *common, "train.stop_at=2")
    out = dsfm("finetune", *common)
    assert "resumed from" in out.stdout
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    state = checkpoint.client_state(run / "checkpoints", "final")
    assert state["config"]["lora"]["rank"] == 0
    n_params = state["n_params"]
    assert f"({n_params / 1e6:.2f}M trained)" in out.stdout  # every weight trains

    dsfm("export", str(pipeline["base"]), "--out", str(root / "hf_base"), "--dtype", "fp32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        root / "hf_base", dtype=torch.float32
    ).eval()
    ours, tok = load_model(pipeline["base"])
    ids = torch.tensor([tok.encode("import os\nprint(os.getcwd())")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-5, rtol=1e-5)
