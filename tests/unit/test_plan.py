"""`dsfm plan`: counts against the built model, activations against autograd's saved
tensors, the recommendation's rules, and the command line."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from dsfm.cli import main
from dsfm.config.deepspeed import read_ds_config
from dsfm.config.load import load_config
from dsfm.model.gpt import GPT
from dsfm.model.ops.linear_cross_entropy import default_chunk_size
from dsfm.plan import GIB, VARIANTS, Hardware, activation_bytes, gib, make_plan
from tests.conftest import ROOT, dsfm, run_cmd

RECIPES = {v[0]: read_ds_config(ROOT / "ds_configs" / f"{v[0]}.json") for v in VARIANTS}
D12 = str(ROOT / "configs" / "d12.yaml")


def hardware(n_gpus: int = 1, memory_gib: float = 80, peak: float | None = 989e12) -> Hardware:
    return Hardware("H100", n_gpus, memory_gib * GIB, peak, min(n_gpus, 8))


def plan_for(overrides: list[str], hw: Hardware, **kwargs) -> tuple[dict, torch.nn.Module]:
    """The plan for d12.yaml + overrides, and the model it describes built on the meta device."""
    cfg = load_config(D12, ["model.vocab_size=32000", *overrides])
    with torch.device("meta"):  # counts without allocating 135M-1.4B weights
        model = GPT(cfg.model)
    return make_plan(cfg, RECIPES, "bf16", hw, **kwargs), model


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.preset=d4"],
        ["model.preset=d12"],
        ["model.preset=135m"],
        ["model.preset=1.4b"],
        ["model.preset=d8", "model.tie_embeddings=true"],
        ["model.preset=d8", "model.n_kv_heads=2"],  # GQA
    ],
)
def test_param_counts_equal_the_built_model(overrides):
    plan, model = plan_for(overrides, hardware())
    assert plan["model"]["params"] == model.num_params()
    assert plan["model"]["non_embedding_params"] == model.num_params(non_embedding=True)


def test_flops_tokens_chinchilla_and_time():
    plan, model = plan_for([], hardware(n_gpus=8))
    assert plan["flops_per_token"] == model.flops_per_token(2048)
    assert plan["batch"]["global"] == 16 * 4 * 8
    assert plan["tokens"] == 20000 * 16 * 4 * 8 * 2048  # max_steps x global batch x seq_len
    assert plan["total_flops"] == plan["flops_per_token"] * plan["tokens"]
    assert plan["chinchilla_tokens"] == 20 * model.num_params()
    assert plan["time_s"] == pytest.approx(plan["total_flops"] / (8 * 989e12 * 0.4))
    # --tokens replaces the config's budget; twice the GPUs at half the MFU take as long.
    other, _ = plan_for([], hardware(n_gpus=16), tokens=plan["tokens"], mfu=0.2)
    assert other["tokens"] == plan["tokens"] and other["tokens_source"] == "--tokens"
    assert other["time_s"] == pytest.approx(plan["time_s"])
    unknown, _ = plan_for([], hardware(peak=None))
    assert unknown["time_s"] is None


def test_epochs_plan_their_passes_over_the_data(byte_data):
    from dsfm.data.dataset import TokenDataset

    plan, _ = plan_for([f"data.path={byte_data}", "train.epochs=2", "train.seq_len=64"], hardware())
    assert plan["tokens"] == 2 * len(TokenDataset(byte_data, "train", 64)) * 64
    assert plan["tokens_source"] == "train.epochs x samples x seq_len"


def saved_bytes(model: torch.nn.Module, batch: int, seq_len: int) -> int:
    """Bytes of the tensors autograd keeps from one training forward (each storage once,
    weights excluded), through saved_tensors_hooks."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            seen.setdefault(s.data_ptr(), s.nbytes())
        return t

    vocab = model.cfg.vocab_size
    x, y = torch.randint(0, vocab, (2, batch, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, labels=y)
    return sum(seen.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_matches_saved_tensors(precision, checkpointing):
    # CPU runs the PyTorch fallbacks (kernels=torch) and SDPA's CPU flash kernel, which like
    # FlashAttention keeps q, k, v, output and log-sum-exp, never the T x T scores. The
    # formula for that path counts every saved tensor, so the tolerance is only for scalars
    # (the loss normaliser): 0.1%. The GPU path (Triton ops) drops two terms and is not
    # measurable here.
    overrides = ["model.kernels=torch", "model.vocab_size=257", "model.preset=d2"]
    overrides += ["model.n_heads=4", "model.n_kv_heads=2", "train.seq_len=32"]
    overrides.append(f"model.activation_checkpointing={str(checkpointing).lower()}")
    cfg = load_config(None, overrides).model
    torch.manual_seed(0)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    model = GPT(cfg).to(dtype).train()
    est = activation_bytes(cfg, 4, 32, precision, checkpointing)
    assert saved_bytes(model, 4, 32) == pytest.approx(est["saved"], rel=1e-3)
    if not checkpointing:  # the transient: one chunk of fp32 logits of the chunked loss
        chunk = default_chunk_size(4 * 32, cfg.d_model, cfg.vocab_size)
        assert est["peak"] - est["saved"] == chunk * cfg.vocab_size * 4


def test_135m_on_one_80gb_gpu_needs_no_offload():
    plan, _ = plan_for(["model.preset=135m"], hardware())
    rec = plan["recommendation"]
    assert rec["variant"] in ("zero0", "zero1", "zero2") and not rec["checkpointing"]
    assert rec["micro_batch"] * rec["grad_accum"] == plan["batch"]["global"]
    assert rec["total_bytes"] <= 0.9 * 80 * GIB


def test_1_4b_on_one_8gb_gpu_needs_offload_and_2gb_refuses():
    plan, _ = plan_for(["model.preset=1.4b"], hardware(memory_gib=8))
    assert plan["recommendation"]["variant"].endswith("_offload")
    assert all(not r["fits"] for r in plan["rows"] if not r["variant"].endswith("_offload"))
    small, _ = plan_for(["model.preset=1.4b"], hardware(memory_gib=2))
    assert small["recommendation"] is None and not any(r["fits"] for r in small["rows"])
    assert small["verdict"].startswith("does not fit on 1x H100 (2 GiB) even with zero3_offload")


def test_d12_on_8_h100_keeps_the_global_batch():
    plan, _ = plan_for([], hardware(n_gpus=8))
    rec = plan["recommendation"]
    assert rec["micro_batch"] * rec["grad_accum"] * 8 == plan["batch"]["global"] == 512
    assert rec["micro_batch"] & (rec["micro_batch"] - 1) == 0  # a power of two
    assert rec["command"].startswith("deepspeed --num_gpus 8 launchers/pretrain.py --ds ")
    assert f"train.micro_batch_size={rec['micro_batch']}" in rec["command"]
    multi, _ = plan_for([], hardware(n_gpus=16))  # two 8-GPU nodes
    assert multi["recommendation"]["command"].startswith(
        "deepspeed --num_nodes 2 --num_gpus 8 --hostfile HOSTFILE launchers/pretrain.py"
    )


def test_micro_batch_is_the_largest_power_of_two_that_fits():
    hw = hardware(n_gpus=8, memory_gib=24)
    plan, _ = plan_for(["train.micro_batch_size=64", "train.grad_accum=1"], hw)
    rec = plan["recommendation"]
    micro = rec["micro_batch"]
    assert 1 <= micro < 64 and rec["fits"]
    tier = ["zero0", "zero1", "zero2"] if rec["variant"] in ("zero0", "zero1", "zero2") else []
    tier = tier or [rec["variant"]]
    bigger, _ = plan_for([f"train.micro_batch_size={2 * micro}", "train.grad_accum=1"], hw)
    same_tier = [
        r
        for r in bigger["rows"]
        if r["variant"] in tier and r["checkpointing"] == rec["checkpointing"]
    ]
    assert same_tier and not any(r["fits"] for r in same_tier)


def test_cli_table_and_json_agree():
    args = ["plan", "--config", "configs/d12.yaml", "--gpus", "8", "--gpu", "H100"]
    text = dsfm(*args).stdout
    data = json.loads(dsfm(*args, "--json").stdout)  # stdout holds the JSON object only
    cells = [
        [c.strip() for c in line.split("│")[1:-1]]
        for line in text.splitlines()
        if line.startswith("│")
    ]
    keys = ["params_bytes", "grads_bytes", "optimizer_bytes", "model_states_bytes"]
    keys += ["activations_bytes", "buffers_bytes", "total_bytes", "cpu_bytes_per_node"]
    assert len(cells) == len(data["rows"]) == 12
    for row, r in zip(cells, data["rows"]):
        assert row[:2] == [r["variant"], "yes" if r["checkpointing"] else "no"]
        assert row[2:10] == [gib(r[k]) for k in keys]
        assert row[10] == ("yes" if r["fits"] else "no")
    assert data["recommendation"]["command"] in text
    assert "vocab 32,000 (assumed" in text  # configs/d12.yaml's data.path does not exist here


def test_plan_imports_neither_torch_nor_deepspeed():
    code = (
        "import sys, contextlib, io; from dsfm.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['plan', '--config', 'configs/d12.yaml', '--json'])\n"
        "print(sorted({'torch', 'deepspeed'} & set(sys.modules)))"
    )
    assert run_cmd([sys.executable, "-c", code]).stdout.strip() == "[]"


def test_unknown_gpu_is_one_clear_error():
    proc = dsfm("plan", "--config", "configs/d12.yaml", "--gpu", "H1000", check=False)
    assert proc.returncode == 2
    assert "dsfm plan: error: unknown GPU 'H1000'; known: H200, H100, A100" in proc.stderr
    assert "--gpu-mem" in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpus", "0"], "--gpus must be >= 1, got 0"),
        (["--mfu", "0"], "--mfu must be in (0, 1], got 0.0"),
        (["--mfu", "1.5"], "--mfu must be in (0, 1], got 1.5"),
        (["--gpu-mem", "-8"], "--gpu-mem must be > 0 GiB"),
        (["--gpus", "3", "train.global_batch_size=64"], "x world size (3) = 192"),
        (["train.micro_batchsize=4"], "unknown key train.micro_batchsize"),
    ],
)
def test_bad_input_exits_2_naming_the_problem(args, message, capsys):
    assert main(["plan", "--config", D12, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsfm plan: error:") and message in err


def test_precision_and_vocab_sources(tmp_path, capsys):
    fp32_ds = tmp_path / "fp32.json"
    fp32_ds.write_text(json.dumps({"zero_optimization": {"stage": 0}}))  # no bf16/fp16 section
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({"vocab_size": 4096}))
    assert main(["plan", "--config", D12, "--ds", str(fp32_ds), f"data.path={data}", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["precision"] == "fp32" and plan["model"]["vocab_size"] == 4096
    assert str(data / "meta.json") in plan["model"]["vocab_source"]
    assert "train.precision=fp32" in plan["recommendation"]["command"]  # the recipes say bf16
    # train.precision wins over the DeepSpeed JSON; model.vocab_size over the data.
    assert (
        main(["plan", "--config", D12, "train.precision=bf16", "model.vocab_size=512", "--json"])
        == 0
    )
    plan = json.loads(capsys.readouterr().out)
    assert plan["precision"] == "bf16" and plan["model"]["vocab_size"] == 512
    assert plan["rows"][0]["params_bytes"] == 2 * plan["model"]["params"]
