"""What only a CUDA GPU can check: `pytest -m gpu` on one GPU machine is the whole GPU check.

Skipped, with the reason, where there is no CUDA (tests/gpu/conftest.py). Training runs go
through the real DeepSpeed launcher on one GPU in bf16 (the shipped recipes' precision);
the kernels run compiled (no interpreter) against their PyTorch fallbacks on the device.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from tests.conftest import deepspeed_train, read_metrics, run_cmd

CUDA = {"DS_ACCELERATOR": "cuda"}
# A model big enough for the GPU to matter, small enough for a minute per run.
SMALL = [
    "model.preset=d8",
    "model.max_seq_len=1024",
    "train.seq_len=512",
    "train.micro_batch_size=8",
    "train.grad_accum=2",
    "train.precision=bf16",
    "optim.lr=1e-3",
    "schedule.warmup_steps=5",
    "train.max_steps=30",
    "eval.every=0",
    "checkpoint.every=0",
    "train.log_every=10",
]
# bf16 runs of different ZeRO stages reduce in different orders: losses agree to about
# bf16's resolution, compounded over 30 Adam steps.
BF16_RTOL = 2e-2


def train(stage: str, run_dir, data, extra=(), port: int = 29800, launcher=None):
    overrides = [*SMALL, f"data.path={data}", f"train.out_dir={run_dir}", *extra]
    kwargs = {"launcher": launcher} if launcher else {}
    deepspeed_train(stage, overrides, nprocs=1, port=port, env=CUDA, **kwargs)
    return np.array([r["loss"] for r in read_metrics(run_dir) if "loss" in r])


@pytest.fixture(scope="module")
def zero2_losses(bpe_data, tmp_path_factory):
    return train("zero2", tmp_path_factory.mktemp("gpu") / "zero2", bpe_data, port=29800)


@pytest.mark.parametrize("stage", ["zero0", "zero1", "zero3", "zero2_offload"])
def test_zero_stages_and_offload_agree_in_bf16(zero2_losses, bpe_data, tmp_path, stage):
    losses = train(stage, tmp_path / stage, bpe_data, port=29801)
    assert len(losses) == 30 and losses[-1] < losses[0] - 0.5
    np.testing.assert_allclose(losses, zero2_losses, rtol=BF16_RTOL, err_msg=stage)


def test_checkpointing_and_compile_run_and_agree(zero2_losses, bpe_data, tmp_path):
    extra = ["model.activation_checkpointing=true", "train.compile=true"]
    losses = train("zero2", tmp_path / "ckpt_compile", bpe_data, extra, port=29802)
    np.testing.assert_allclose(losses, zero2_losses, rtol=BF16_RTOL)


def test_a_d20_run_fits_an_8gb_budget_with_zero2_offload(bpe_data, tmp_path):
    """The GPU is capped at 8 GiB for the training process; `dsfm plan` says this fits."""
    overrides = [
        "model.preset=d20",
        "train.seq_len=2048",
        "train.micro_batch_size=1",
        "train.grad_accum=1",
        "model.activation_checkpointing=true",
        "train.max_steps=3",
    ]
    budget = tmp_path / "budget.py"
    budget.write_text(
        "import sys, torch\n"
        "total = torch.cuda.get_device_properties(0).total_memory\n"
        "torch.cuda.set_per_process_memory_fraction(8 * 2**30 / total)\n"
        "from dsfm.cli import main\n"
        "sys.exit(main(['train', *sys.argv[1:]]))\n"
    )
    losses = train(
        "zero2_offload", tmp_path / "d20", bpe_data, overrides, port=29803, launcher=str(budget)
    )
    assert len(losses) == 3 and np.isfinite(losses).all()


# ---------------------------------------------------------------- kernels on the device


def _grads(fn, inputs, seed=7):
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*inputs)
    g = torch.randn(out.shape, generator=torch.Generator("cuda").manual_seed(seed), device="cuda")
    grads = torch.autograd.grad(out, [t for t in inputs if t.requires_grad], g.to(out.dtype))
    return [out, *grads]


TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_triton_kernel_equals_its_fallback_on_the_device(dtype):
    from dsfm.model import ops
    from dsfm.model.gpt import rope_cos_sin

    torch.manual_seed(0)
    x = torch.randn(4, 256, 1024, device="cuda", dtype=dtype)
    w = 1 + 0.1 * torch.randn(1024, device="cuda", dtype=dtype)
    gate, up = (torch.randn(4, 256, 2816, device="cuda", dtype=dtype) for _ in range(2))
    q = torch.randn(4, 16, 256, 64, device="cuda", dtype=dtype)
    cos, sin = rope_cos_sin(torch.arange(256, device="cuda"), 64, 10000.0)
    cases = {
        "rms_norm": (lambda x, w, impl: ops.rms_norm(x, w, 1e-5, impl), [x, w]),
        "swiglu": (lambda g, u, impl: ops.swiglu(g, u, impl), [gate, up]),
        "rope": (lambda q, impl: ops.apply_rope(q, cos, sin, impl), [q]),
    }
    for name, (fn, inputs) in cases.items():
        want = _grads(lambda *a, fn=fn: fn(*a, "torch"), inputs)
        got = _grads(lambda *a, fn=fn: fn(*a, "triton"), inputs)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a.float(), b.float(), **TOL[dtype], msg=name)
    h = torch.randn(2048, 512, device="cuda", dtype=dtype)
    head = 0.02 * torch.randn(32768, 512, device="cuda", dtype=dtype)
    labels = torch.randint(0, 32768, (2048,), device="cuda")
    labels[::7] = -100
    want = _grads(lambda h, w: ops.linear_cross_entropy(h, w, labels, impl="torch"), [h, head])
    got = _grads(lambda h, w: ops.linear_cross_entropy(h, w, labels, impl="triton"), [h, head])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-4)


def test_an_export_gives_transformers_logits_on_the_device(tmp_path):
    transformers = pytest.importorskip("transformers")
    from dsfm.config.load import load_config, to_dict
    from dsfm.data.tokenizer import byte_tokenizer
    from dsfm.interop.hf import export_hf
    from dsfm.interop.weights import load_model, save_plain
    from dsfm.model.gpt import GPT

    cfg = load_config(None, ["model.preset=d8", "model.vocab_size=257", "model.n_kv_heads=4"])
    torch.manual_seed(0)
    tok = byte_tokenizer().save(tmp_path / "tok")
    state = {"config": to_dict(cfg)}
    plain = save_plain(tmp_path / "plain", GPT(cfg.model).state_dict(), state, tok)
    export_hf(plain, tmp_path / "hf", dtype="fp32")
    ours, tok = load_model(plain)
    ours = ours.cuda()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    hf = hf.cuda().eval()
    ids = torch.tensor([tok.encode("def f(x):\n    return x ** 2\n" * 8)], device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)


def test_the_benchmarks_run_on_the_device(tmp_path):
    out = tmp_path / "throughput.json"
    run_cmd(
        [
            sys.executable,
            "benchmarks/throughput.py",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--ds-adam",
            "--out",
            str(out),
        ],
        env=CUDA,
        timeout=900,
    )
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert all(r["tokens_per_s"] > 0 and r["mfu"] for r in rows.values())
    assert {"zero2-triton", "zero2-torch-dsadam"} <= set(rows)
