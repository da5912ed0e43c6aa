"""`dsfm doctor`: can this machine run these configs? Answered before anything is built.

The report: versions (python, torch with its CUDA and NCCL, deepspeed, triton, transformers),
the accelerator DeepSpeed will use and the GPUs torch sees, the toolchain DeepSpeed's JIT
builds with (C++ compiler, ninja, nvcc, the torch extensions cache), and for each chosen
DeepSpeed recipe its ZeRO stage, precision and offload, the compiled ops a run of it loads
with the state of each (prebuilt, built in the cache, buildable here, missing), and a verdict.
Every missing piece comes with its fix. Exit status 0 when every chosen recipe can run, 1
when one cannot.

`preflight` is the same judgement for the one config a `dsfm train` is about to run: the
trainer calls it after resolving the configs, so a run that would die in DeepSpeed's JIT
build or at `deepspeed.initialize` stops first, with the fix, as a configuration error.

Which ops a config needs and what state each is in is asked of DeepSpeed in
`dsfm.train.engine` (the one module that imports it); this module decides and reports.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from typing import Any

import torch

from dsfm.config.deepspeed import fill_ds_config, precision, read_ds_config, zero_stage
from dsfm.config.load import RECIPES, find_recipe, load_config
from dsfm.config.schema import Config, ConfigError
from dsfm.distributed.env import world_size
from dsfm.train import engine

READY = ("prebuilt", "built", "buildable")


def preflight(ds: dict[str, Any], accelerator: str) -> list[str]:
    """The problems that stop a run of the filled DeepSpeed config `ds` on `accelerator`
    (DeepSpeed's device name) here, each with its fix; empty when it can run."""
    return check_recipe(ds, accelerator)["problems"]


def check_recipe(ds: dict[str, Any], accelerator: str) -> dict[str, Any]:
    """ZeRO stage, precision, offload, the ops a run loads with their state, and the
    problems (accelerator, precision, ops) that stop it."""
    zero = ds.get("zero_optimization") or {}
    prec = precision(ds)
    problems = accelerator_problems(accelerator)
    if not problems and not engine.precision_supported(prec):
        problems.append(_precision_problem(prec, accelerator))
    ops = []
    for builder_class, why in engine.ops_needed(ds):
        status = engine.op_status(builder_class)
        missing = [{"problem": problem, "fix": fix} for problem, fix in status["missing"]]
        ops.append({**status, "why": why, "missing": missing})
        problems += _op_problems(ops[-1])
    return {
        "zero_stage": zero_stage(ds),
        "precision": prec,
        "offload_optimizer": (zero.get("offload_optimizer") or {}).get("device", "none"),
        "offload_param": (zero.get("offload_param") or {}).get("device", "none"),
        "ops": ops,
        "problems": problems,
        "can_run": not problems,
    }


def _op_problems(op: dict[str, Any]) -> list[str]:
    return [
        f"DeepSpeed op {op['op']} ({op['why']}) cannot be loaded: {m['problem']}. Fix: {m['fix']}"
        for m in op["missing"]
    ]


def accelerator_problems(accelerator: str) -> list[str]:
    """A DeepSpeed accelerator this process cannot use (DS_ACCELERATOR=cuda without a GPU)."""
    if accelerator != "cuda" or torch.cuda.is_available():
        return []
    if torch.version.cuda is None:
        why, fix = f"torch {torch.__version__} is a CPU build", "install a CUDA build of torch"
    elif os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        why = f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r} hides every GPU"
        fix = "unset CUDA_VISIBLE_DEVICES or list the GPUs to use"
    else:
        why, fix = "no GPU or driver is visible (does `nvidia-smi` list one?)", "run on a GPU node"
    return [
        f"DeepSpeed's accelerator is cuda but torch sees no CUDA device: {why}. Fix: {fix}, "
        "or set DS_ACCELERATOR=cpu to train on the CPU"
    ]


def _precision_problem(prec: str, accelerator: str) -> str:
    other = "fp16" if prec == "bf16" else "bf16"
    choices = f"{other} or fp32" if engine.precision_supported(other) else "fp32"
    return (
        f"{prec} is not supported on this {accelerator} device (DeepSpeed stops at initialize: "
        f"'Type {prec} is not supported on your device'). Fix: set train.precision={choices}"
    )


def environment() -> dict[str, Any]:
    """Versions, the accelerator and the GPUs torch sees, DeepSpeed's JIT toolchain."""
    versions = {"python": platform.python_version(), **engine.versions()}
    versions["torch_cuda"] = torch.version.cuda
    versions["nccl"] = _nccl_version()
    for package in ("triton", "transformers"):
        versions[package] = _package_version(package)
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append(
                {
                    "index": i,
                    "name": p.name,
                    "memory_gib": round(p.total_memory / 2**30, 1),
                    "capability": f"{p.major}.{p.minor}",
                }
            )
    return {
        "versions": versions,
        "accelerator": engine.accelerator_name(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "gpus": gpus,
        "toolchain": engine.toolchain(),
        "installed_ops": engine.installed_ops(),
    }


def make_report(recipes: list[str], cfg: Config) -> dict[str, Any]:
    """The whole report: the environment and one entry per recipe path."""
    env = environment()
    accelerator = env["accelerator"]
    entries = []
    for path in recipes:
        entry: dict[str, Any] = {"recipe": path}
        try:
            # the DeepSpeed config as `dsfm train` fills it (train.precision wins, ...)
            ds = fill_ds_config(read_ds_config(path), cfg, world_size())
        except ConfigError as e:
            entry.update(can_run=False, problems=e.problems, ops=[])
        else:
            entry.update(check_recipe(ds, accelerator))
        entries.append(entry)
    return {**env, "recipes": entries, "ok": all(e["can_run"] for e in entries)}


def doctor_command(
    ds: list[str] | None, config: str | None, overrides: list[str], as_json: bool
) -> int:
    recipes = [find_recipe(p, "ds_configs") for p in ds] if ds else _shipped_recipes()
    cfg = load_config(find_recipe(config, "configs") if config else None, overrides)
    report = make_report(recipes, cfg)
    if as_json:
        print(json.dumps(report))
    else:
        print_report(report)
    return 0 if report["ok"] else 1


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console

    console = Console() if sys.stdout.isatty() else Console(width=120)

    def line(text: str, style: str | None = None) -> None:
        console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)

    v, tc = report["versions"], report["toolchain"]
    cuda = f"CUDA {v['torch_cuda']}, NCCL {v['nccl']}" if v["torch_cuda"] else "CPU build"
    line(
        f"versions     python {v['python']}, dsfm {v['dsfm']}, torch {v['torch']} ({cuda}), "
        f"deepspeed {v['deepspeed']}, triton {v['triton'] or 'not installed'}, "
        f"transformers {v['transformers'] or 'not installed'}"
    )
    visible = report["cuda_visible_devices"]
    cuda = "CUDA available" if report["cuda_available"] else "CUDA not available"
    line(
        f"accelerator  {report['accelerator']} (DS_ACCELERATOR, else cuda when torch sees a GPU); "
        f"{cuda}; {len(report['gpus'])} GPU(s)"
        + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
    )
    for g in report["gpus"]:
        line(f"  GPU {g['index']}: {g['name']}, {g['memory_gib']} GiB, compute {g['capability']}")
    cxx = f"{tc['cxx_path']} ({tc['cxx_version']})" if tc["cxx_path"] else f"{tc['cxx']}: not found"
    ninja = f"{tc['ninja_path']} ({tc['ninja_version']})" if tc["ninja_path"] else "not found"
    nvcc = f"{tc['nvcc_path']} ({tc['nvcc_version']})" if tc["nvcc_path"] else "not found"
    line(f"toolchain    C++ {cxx}; ninja {ninja}; nvcc {nvcc}")
    built = ", ".join(report["installed_ops"]) or "none (each is compiled on first use)"
    line(f"ops          prebuilt in the DeepSpeed install: {built}")
    line(f"             JIT builds go to the torch extensions cache {tc['extensions_dir']}")
    for entry in report["recipes"]:
        line("")
        if "zero_stage" in entry:
            offload = [
                f"{what} offload to {entry[f'offload_{what}']}"
                for what in ("optimizer", "param")
                if entry[f"offload_{what}"] not in ("none", None)
            ]
            line(
                f"{entry['recipe']}: ZeRO-{entry['zero_stage']}, {entry['precision']}, "
                + (", ".join(offload) or "no offload")
            )
        else:
            line(f"{entry['recipe']}:")
        if not entry["ops"] and "zero_stage" in entry:
            line("  ops: none")
        for op in entry["ops"]:
            style = "green" if op["status"] in READY else "red"
            line(f"  {op['op']:<19} {op['status']:<10} for {op['why']}", style)
            if op["status"] == "buildable":
                if op["cache"] == "stale":  # e.g. another venv's torch built it last
                    line(f"{'':22}cached build out of date (another torch, DeepSpeed or ninja)")
                line(f"{'':22}compiled on first use (~40 s) into {op['where']}")
            elif op["where"]:
                line(f"{'':22}{op['where']}")
            for m in op["missing"]:
                line(f"{'':22}{m['problem']}", "red")
                line(f"{'':22}fix: {m['fix']}", "red")
        shown = {p for op in entry["ops"] for p in _op_problems(op)}
        for problem in entry["problems"]:
            if problem not in shown:
                line(f"  problem: {problem}", "red")
        if entry["can_run"]:
            line("  -> can run here", "bold green")
        else:
            line(f"  -> cannot run here ({len(entry['problems'])} problem(s))", "bold red")
    bad = [e["recipe"] for e in report["recipes"] if not e["can_run"]]
    line("")
    n = len(report["recipes"])
    if bad:
        line(f"{len(bad)} of {n} recipe(s) cannot run here: {', '.join(bad)}", "bold red")
    else:
        line(f"all {n} recipe(s) can run here", "bold green")


def _shipped_recipes() -> list[str]:
    return [str(p) for p in sorted((RECIPES / "ds_configs").glob("*.json"))]


def _nccl_version() -> str | None:
    try:
        version = torch.cuda.nccl.version()
    except Exception:  # a CPU build has no NCCL
        return None
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
