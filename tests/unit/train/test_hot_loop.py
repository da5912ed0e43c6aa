"""The hot loop on a real engine: torch's fused AdamW under ZeRO 0-3 (no DeepSpeed op is
built, so no compiler is needed), DeepSpeed's CPU Adam only for offload, and one host read
of the device per optimizer step, bad steps included.

The engines are built in one subprocess (a one-rank process group), so this process keeps
no DeepSpeed state. A TorchFunctionMode counts the calls that make the host wait for the
device (`.item()`, `.tolist()`, `bool()`, `float()`, ...) made from dsfm's own code, per
`train_step`; DeepSpeed's internal reads are its business and not counted.
"""

from __future__ import annotations

import json
import sys

import pytest

from dsfm.config.deepspeed import fill_ds_config, read_ds_config
from dsfm.config.load import load_config
from tests.conftest import ROOT, TINY, run_cmd

PROBE = r"""
import json, sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
import deepspeed.ops.op_builder.builder as builder

built = []
for name in ("load", "jit_load"):
    def spy(self, *args, _orig=getattr(builder.OpBuilder, name), **kwargs):
        built.append(type(self).__name__)
        return _orig(self, *args, **kwargs)
    setattr(builder.OpBuilder, name, spy)

from dsfm.config.resolve import resolve_configs
from dsfm.distributed.env import ensure_env
from dsfm.testing import faults
from dsfm.train import engine as ds_engine
from dsfm.train.trainer import Trainer

HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu",
              "numpy", "nonzero"}
# The model checks token ids only on CPU tensors, where reading them waits for nothing
# (test_model_reads_no_accelerator_tensor); on a GPU the data side has checked them.
CPU_ONLY = {"_check_inputs"}
DSFM = str(Path(__import__("dsfm").__file__).parent)

class Reads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []
    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        caller = sys._getframe(1)
        own = caller.f_code.co_filename.startswith(DSFM)
        if name in HOST_READS and own and caller.f_code.co_name not in CPU_ONLY:
            self.calls.append(f"{name} at {caller.f_code.co_name}:{caller.f_lineno}")
        return func(*args, **(kwargs or {}))

data, out = sys.argv[1], Path(sys.argv[2])
ensure_env()
ds_engine.init_distributed()
built.clear()  # the CPU accelerator's shared-memory comm op: not an optimizer's, and CPU-only
report = {}
for stage in ("zero0", "zero2", "zero3"):
    overrides = [*json.loads(sys.argv[3]), f"data.path={data}", f"train.out_dir={out / stage}"]
    cfg, ds = resolve_configs(None, f"ds_configs/{stage}.json", overrides, 1)
    trainer = Trainer(cfg, ds)
    faults._fired.clear()  # each stage sees its own NaN step
    opt = trainer.engine.basic_optimizer
    reads = []
    for step in range(4):  # the fault hook makes step 3 a NaN step
        with Reads() as mode:
            trainer.train_step()
        reads.append(mode.calls)
    report[stage] = {"optimizer": type(opt).__module__ + "." + type(opt).__name__,
                     "fused": opt.defaults.get("fused"), "reads": reads,
                     "skipped": trainer.engine.skipped_steps}
report["built"] = built
print("REPORT " + json.dumps(report))
"""


def test_fused_torch_adamw_no_op_build_and_one_host_read_per_step(byte_data, tmp_path):
    overrides = [o for o in TINY if not o.startswith("train.log_every")] + [
        "train.max_steps=10",
        "eval.every=0",
        "checkpoint.every=0",
    ]
    env = {"DSFM_FAULT": "nan_at=3"}
    cmd = [sys.executable, "-c", PROBE, str(byte_data), str(tmp_path), json.dumps(overrides)]
    proc = run_cmd(cmd, env=env, timeout=300)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("REPORT "))
    report = json.loads(line.removeprefix("REPORT "))
    assert report.pop("built") == []  # no DeepSpeed op was loaded or JIT-compiled
    for stage, r in report.items():
        assert r["optimizer"] == "torch.optim.adamw.AdamW" and r["fused"], stage
        assert r["skipped"] == 1, (stage, r)  # the NaN step was discarded
        for step, calls in enumerate(r["reads"], 1):
            assert len(calls) <= 1, (stage, step, calls)
        assert all(len(calls) == 1 for calls in r["reads"]), (stage, r["reads"])


@pytest.mark.parametrize(
    "recipe, torch_adam",
    [("zero0", True), ("zero3", True), ("zero2_offload", False), ("zero3_offload", False)],
)
def test_only_offload_leaves_the_optimizer_to_deepspeed(recipe, torch_adam):
    cfg = load_config(None, TINY)
    ds = fill_ds_config(read_ds_config(ROOT / "ds_configs" / f"{recipe}.json"), cfg, 1)
    params = ds["optimizer"]["params"]
    assert params.get("torch_adam", False) is torch_adam
    assert params.get("fused", False) is torch_adam  # DeepSpeed's CPU Adam takes no `fused`


def test_model_reads_no_accelerator_tensor():
    """The id check that would wait for a GPU on every forward is skipped off the CPU (the
    meta device stands in for an accelerator: any read of it would raise)."""
    import torch

    from dsfm.model.config import ModelConfig
    from dsfm.model.gpt import GPT

    model = GPT(ModelConfig(vocab_size=64, n_layers=1, d_model=32, n_heads=2, max_seq_len=16))
    model._check_inputs(torch.zeros(1, 8, dtype=torch.long, device="meta"), 0, None)
    with pytest.raises(ValueError, match="token ids"):
        model._check_inputs(torch.full((1, 8), 64), 0, None)
