"""`dsfm doctor` and the train preflight against this machine: DeepSpeed's real op builders,
the compiler and ninja really on PATH (or taken off it), real torch extension caches made by
a real ninja. Nothing is JIT-built: a build would take ~40 s, and proving that none starts is
part of what is tested."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import deepspeed
import pytest
import torch
from deepspeed.accelerator import get_accelerator
from torch.utils import cpp_extension

from dsfm import doctor
from dsfm.cli import main
from dsfm.config.deepspeed import read_ds_config
from dsfm.train import engine
from tests.conftest import ROOT

NINJA = shutil.which("ninja")
CXX = shutil.which(os.environ.get("CXX", "c++"))
# DeepSpeed's CPU accelerator loads its shared-memory collectives in every run
COMM = ["ShareMemCommBuilder"] if engine.accelerator_name() == "cpu" else []
needs_ninja = pytest.mark.skipif(NINJA is None, reason="ninja is not installed here")


def recipe(name: str) -> str:
    return str(ROOT / "ds_configs" / f"{name}.json")


def ops(ds: dict) -> list[str]:
    return [builder for builder, _ in engine.ops_needed(ds)]


def nvme_recipe(tmp_path: Path, optimizer: bool = True) -> Path:
    ds = read_ds_config(recipe("zero3"))
    if optimizer:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "nvme", "nvme_path": "/tmp"}
    ds["zero_optimization"]["offload_param"] = {"device": "nvme", "nvme_path": "/tmp"}
    path = tmp_path / "zero3_nvme.json"
    path.write_text(json.dumps(ds))
    return path


def only_ninja_on_path(tmp_path: Path, monkeypatch) -> None:
    """PATH without any compiler: a directory holding ninja alone; CXX unset."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ninja").symlink_to(NINJA)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("CXX", raising=False)


def run_doctor(capsys, *args: str) -> tuple[int, dict]:
    code = main(["doctor", *args, "--json"])
    return code, json.loads(capsys.readouterr().out)


def statuses(report: dict) -> dict[tuple[str, str], dict]:
    return {(Path(e["recipe"]).stem, op["op"]): op for e in report["recipes"] for op in e["ops"]}


def test_ops_follow_the_deepspeed_configs_offload():
    for name in ("zero0", "zero1", "zero2", "zero3"):  # torch's AdamW: no DeepSpeed op
        assert ops(read_ds_config(recipe(name))) == COMM, name
    for name in ("zero2_offload", "zero3_offload"):
        assert ops(read_ds_config(recipe(name))) == [*COMM, "CPUAdamBuilder"], name


def test_nvme_offload_needs_async_io_and_pin_memory(tmp_path):
    aio = ["PinMemoryBuilder", "AsyncIOBuilder"]
    assert ops(read_ds_config(nvme_recipe(tmp_path))) == [*COMM, "CPUAdamBuilder", *aio]
    assert ops(read_ds_config(nvme_recipe(tmp_path, optimizer=False))) == [*COMM, *aio]


@needs_ninja
@pytest.mark.skipif(CXX is None, reason="no C++ compiler here")
def test_zero0_zero2_and_offload_can_run_here_and_nothing_is_built(tmp_path, monkeypatch, capsys):
    ext = tmp_path / "torch_extensions"  # an empty cache: every op has to be buildable
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(ext))
    code, report = run_doctor(
        capsys, "--ds", recipe("zero0"), "--ds", recipe("zero2"), "--ds", recipe("zero2_offload")
    )
    assert code == 0 and report["ok"], report["recipes"]
    ops_ = statuses(report)
    assert ops_[("zero2_offload", "cpu_adam")]["status"] == "buildable"
    assert {op["status"] for op in ops_.values()} == {"buildable"}
    assert not [k for k in ops_ if k[1] == "cpu_adam" and k[0] != "zero2_offload"]
    assert not ext.exists()  # asking built nothing, not even the cache directory


@needs_ninja
def test_without_a_compiler_an_empty_cache_cannot_run(tmp_path, monkeypatch, capsys):
    only_ninja_on_path(tmp_path, monkeypatch)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))
    code, report = run_doctor(capsys, "--ds", recipe("zero2_offload"))
    assert code == 1 and not report["ok"]
    cpu_adam = statuses(report)[("zero2_offload", "cpu_adam")]
    assert cpu_adam["status"] == "missing"
    [missing] = cpu_adam["missing"]
    assert "no C++ compiler to build cpu_adam: `c++`" in missing["problem"]
    assert "g++" in missing["fix"] and "CXX" in missing["fix"]
    assert len(report["recipes"][0]["problems"]) == 1 + len(COMM)  # + the CPU collectives


def cached_build(ext: Path, name: str) -> Path:
    """A build in the torch extensions cache, made by ninja as torch makes one: a build.ninja
    naming this torch's headers and DeepSpeed's sources, the library, ninja's log. (Its rule
    copies a file instead of compiling, so no compiler is needed to make it.)"""
    build = ext / name
    build.mkdir(parents=True)
    (build / "source.cpp").write_text("// the op's source\n")
    torch_headers, ds_sources = cpp_extension.include_paths()[0], Path(deepspeed.__file__).parent
    (build / "build.ninja").write_text(
        f"# -isystem {torch_headers} {ds_sources}/csrc\n"
        "rule cp\n  command = cp $in $out\n"
        f"build {name}.so: cp source.cpp\n"
    )
    subprocess.run([NINJA], cwd=build, check=True, capture_output=True)
    return build


@needs_ninja
def test_a_cached_build_runs_without_a_compiler_until_ninja_would_redo_it(
    tmp_path, monkeypatch, capsys
):
    ext = tmp_path / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(ext))
    for name in ["cpu_adam", *(["deepspeed_shm_comm"] if COMM else [])]:
        cached_build(ext, name)
    only_ninja_on_path(tmp_path, monkeypatch)
    code, report = run_doctor(capsys, "--ds", recipe("zero2_offload"))
    cpu_adam = statuses(report)[("zero2_offload", "cpu_adam")]
    assert code == 0 and (cpu_adam["status"], cpu_adam["where"]) == ("built", str(ext / "cpu_adam"))

    # A changed source (a DeepSpeed upgrade in place): loading would rebuild, and cannot here
    later = (ext / "cpu_adam" / "cpu_adam.so").stat().st_mtime + 10
    os.utime(ext / "cpu_adam" / "source.cpp", (later, later))
    code, report = run_doctor(capsys, "--ds", recipe("zero2_offload"))
    cpu_adam = statuses(report)[("zero2_offload", "cpu_adam")]
    assert code == 1 and cpu_adam["status"] == "missing"
    assert "cached build in" in cpu_adam["missing"][0]["problem"]
    assert "out of date" in cpu_adam["missing"][0]["problem"]


def test_nvme_offload_without_libaio_cannot_run(tmp_path, capsys):
    if Path("/usr/include/libaio.h").exists():
        pytest.skip("libaio is installed here: NVMe offload may well run")
    code, report = run_doctor(capsys, "--ds", str(nvme_recipe(tmp_path)))
    async_io = statuses(report)[("zero3_nvme", "async_io")]
    assert code == 1 and async_io["status"] == "missing"
    assert "libaio" in async_io["missing"][0]["problem"]
    assert "libaio" in async_io["missing"][0]["fix"]


def test_preflight_refuses_a_precision_the_device_lacks():
    ds = read_ds_config(recipe("zero0"))  # bf16: DeepSpeed runs it on CPUs too (tried)
    assert not [p for p in doctor.preflight(ds, engine.accelerator_name()) if "bf16" in p]
    if get_accelerator().is_fp16_supported():
        pytest.skip("this device supports fp16")
    ds = {**ds, "bf16": {"enabled": False}, "fp16": {"enabled": True}}
    [problem] = [p for p in doctor.preflight(ds, engine.accelerator_name()) if "fp16" in p]
    assert "Type fp16 is not supported on your device" in problem
    assert problem.endswith("Fix: set train.precision=bf16 or fp32")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here")
def test_preflight_refuses_the_cuda_accelerator_without_a_gpu():
    [problem] = [p for p in doctor.preflight({}, "cuda") if "cuda" in p]
    assert "torch sees no CUDA device" in problem and "DS_ACCELERATOR=cpu" in problem
