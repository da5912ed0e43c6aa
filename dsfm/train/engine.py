"""The one module that imports deepspeed: the process group, the engine, its checkpoints.

The DeepSpeed config arrives filled (`dsfm.config.deepspeed.fill_ds_config`); here it is
run: `initialize` wraps the model with its optimizer (decay on matrices only), with no
DeepSpeed LR scheduler: the trainer sets each update's LR with `set_lr`
(`dsfm/train/schedule.py`). The few places dsfm reaches past the engine's public API are
named and explained (`step` for ZeRO-0 in fp32, `set_lr`, the universal-checkpoint load
for re-sharding).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dsfm.config.deepspeed import zero_stage
from dsfm.distributed.env import LaunchError, local_rank, rank, rendezvous_problem
from dsfm.train import checkpoint

os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

import deepspeed  # noqa: E402  (DS_ACCELERATOR must be set before import)
from deepspeed.accelerator import get_accelerator  # noqa: E402
from deepspeed.utils import logger as ds_logger  # noqa: E402

ds_logger.setLevel(os.environ.get("DSFM_DS_LOG_LEVEL", "WARNING"))


def accelerator_name() -> str:
    return get_accelerator().device_name()


def device() -> torch.device:
    name = accelerator_name()
    if name == "cpu":
        return torch.device("cpu")
    return torch.device(name, local_rank())


def init_distributed(timeout_s: float = 0) -> None:
    """Join the process group; a collective that never completes errors after `timeout_s`."""
    backend = (
        "gloo" if accelerator_name() == "cpu" else get_accelerator().communication_backend_name()
    )
    if accelerator_name() != "cpu":
        get_accelerator().set_device(local_rank())
    kwargs = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s > 0 else {}
    try:
        deepspeed.init_distributed(dist_backend=backend, verbose=False, **kwargs)
    except torch.distributed.DistError as e:  # a busy port, an unreachable master: one line
        raise LaunchError(rendezvous_problem(str(e))) from None


def build_model(make: Callable[[], torch.nn.Module], ds: dict[str, Any]) -> torch.nn.Module:
    """`make()`, under ZeRO-3 inside `deepspeed.zero.Init`: each parameter is cut into
    per-rank partitions as its module is built, so no rank ever holds the whole model. The
    values drawn while building are lost in the partitioning: fill them with `fill_modules`.
    """
    if zero_stage(ds) != 3:
        return make()
    with deepspeed.zero.Init(config_dict_or_path=ds):
        return make()


def fill_modules(
    model: torch.nn.Module, fill: Callable[[str, torch.nn.Module], None], partitioned: bool
) -> None:
    """`fill(name, module)` for every module that owns parameters. On a partitioned model one
    module's parameters are gathered at a time and rank 0's values are kept (broadcast and
    re-partitioned on the way out), so memory holds one module whole, never the model."""
    for name, module in model.named_modules():
        params = list(module.parameters(recurse=False))
        if not params:
            continue
        if not partitioned:
            fill(name, module)
            continue
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if rank() == 0:
                fill(name, module)


def param_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Every parameter's full shape by name (shared tensors once), also when partitioned."""
    return {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters()}


def count_params(model: torch.nn.Module, trainable: bool = False) -> int:
    """Parameters of `model` (shared tensors once), also when ZeRO-3 has partitioned them."""
    params = {id(p): p for p in model.parameters() if p.requires_grad or not trainable}
    return sum(getattr(p, "ds_numel", p.numel()) for p in params.values())


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay only matrices (linear and embedding weights), never norms or biases."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:  # a ZeRO-3 partition is flat: its full shape is ds_shape
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def initialize(
    model: torch.nn.Module, ds: dict[str, Any], weight_decay: float, compile: bool = False
) -> Any:
    """Wrap the model in a DeepSpeed engine (its optimizer built from `ds`; no scheduler).

    compile: `engine.compile()`, DeepSpeed's own torch.compile of the wrapped module, which
    keeps its ZeRO hooks outside the compiled graph (compiling the bare model before
    `initialize` would trace through them and break the graph at every gather).
    """
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, weight_decay), config=ds
    )
    if compile:
        engine.compile()
    return engine


def versions() -> dict[str, str]:
    import dsfm

    return {
        "dsfm": dsfm.__version__,
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
    }


def grad_norm_before_step(engine: Any) -> torch.Tensor | None:
    """Pre-clip global gradient norm for ZeRO-0, where DeepSpeed does not record it, as a
    device tensor (no host read).

    Call after the last micro-batch's backward (gradients are already averaged across
    ranks) and before `engine.step()`; ZeRO 1-3 report the same quantity themselves.
    """
    if engine.zero_optimization_stage() != 0:
        return None
    norms = [
        p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None
    ]
    return torch.stack(norms).norm() if norms else None


def set_lr(engine: Any, lr: float) -> None:
    """The LR of the next update, on every parameter group. DeepSpeed's ZeRO and bf16
    optimizers expose the wrapped torch optimizer's groups as their own `param_groups`, and
    with no DeepSpeed scheduler nothing else writes `lr`; a checkpoint load restores the
    saved value, which the next `set_lr` overwrites."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def skips_on_device(engine: Any) -> bool:
    """ZeRO-0 in fp32: DeepSpeed hands the update to torch's AdamW unchecked, so `step` skips
    a non-finite one itself. Every other stage and precision discards it in DeepSpeed
    (see guard.py)."""
    return (
        engine.zero_optimization_stage() == 0
        and not engine.bfloat16_enabled()
        and not engine.fp16_enabled()
    )


def step(engine: Any, grad_norm: torch.Tensor | None = None) -> None:
    """`engine.step()`; under ZeRO-0 in fp32 an update whose norm is not finite is skipped on
    the device.

    torch's fused AdamW takes `found_inf` (the tensor AMP's GradScaler sets): when it is 1 the
    kernel leaves weights, moments and step count alone, with no host read. DeepSpeed does
    not see that skip, so once the step's one host read shows it the trainer calls
    `count_skipped`. `grad_norm` is `grad_norm_before_step` at the accumulation
    boundary, None elsewhere.
    """
    if grad_norm is None or not skips_on_device(engine):
        engine.step()
        return
    opt = engine.optimizer
    if not opt.defaults.get("fused"):
        raise RuntimeError(
            "ZeRO-0 in fp32 needs torch's fused AdamW to skip a non-finite update on the "
            'device; remove "torch_adam"/"fused" overrides from the DeepSpeed config\'s optimizer'
        )
    opt.found_inf = (~torch.isfinite(grad_norm)).float()
    try:
        engine.step()
    finally:
        del opt.found_inf


def count_skipped(engine: Any) -> None:
    """After an update `step` skipped on the device: count it, as DeepSpeed counts the
    updates it skips itself."""
    engine.skipped_steps += 1


def save_checkpoint(engine: Any, ckpt_dir: Path, tag: str) -> Exception | None:
    """`engine.save_checkpoint` into `ckpt_dir/tag`, returning a failed file write instead
    of raising it. DeepSpeed's save holds barriers between its writes, so a rank that
    raised from a full disk would leave the others waiting in one; here the failing rank
    skips its remaining writes and goes on through every collective, and the caller agrees
    on the outcome with the other ranks. Reaches past the public API: the engine's
    `checkpoint_engine.save` (every shard) and the ZeRO recovery-script copy (rank 0)."""
    errors: list[Exception] = []

    def deferred(write: Callable[..., Any]) -> Callable[..., None]:
        def attempt(*args: Any, **kwargs: Any) -> None:
            if errors:
                return
            try:
                write(*args, **kwargs)
            except (OSError, RuntimeError) as e:  # torch's zip writer raises RuntimeError
                errors.append(e)

        return attempt

    targets = [(engine.checkpoint_engine, "save"), (engine, "_copy_recovery_script")]
    for obj, name in targets:
        setattr(obj, name, deferred(getattr(obj, name)))
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    finally:
        for obj, name in targets:
            delattr(obj, name)  # the class's method again
    return errors[0] if errors else None


def to_universal(tag_dir: Path, out_dir: Path) -> None:
    """Convert a ZeRO-1/2/3 tag into DeepSpeed's universal format (one file per parameter
    and optimizer moment, independent of the number of ranks). Rank 0 only."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = argparse.Namespace(
        input_folder=str(tag_dir),
        output_folder=str(out_dir),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # our tags predate the universal-info field: add it
    )
    with contextlib.redirect_stdout(sys.stderr):  # it prints progress to stdout
        ds_to_universal(args)


def load_universal(engine: Any, ckpt_dir: Path, tag: str) -> None:
    """Load a universal tag: on any number of ranks, ZeRO shards re-cut for this world.

    DeepSpeed reads `checkpoint.load_universal` from its config; flipping it around this
    one load keeps every later load (a rollback) on the ordinary, faster path.
    """
    # DeepSpeed 0.19.8's ZeRO-3 universal load (a) copies param group 0's hyper-parameters
    # into every group, which would give norms our matrices' weight decay, and (b) gives all
    # groups one shared Adam `step` tensor, which torch then increments once per group per
    # update (wrong bias correction). Keep our hyper-parameters; give each group its own step.
    groups = engine.optimizer.param_groups
    ours = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in groups]
    engine._config.load_universal_checkpoint = True
    try:
        path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    finally:
        engine._config.load_universal_checkpoint = False
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load universal checkpoint {ckpt_dir / tag}")
    for group, hyper in zip(engine.optimizer.param_groups, ours):
        group.update(hyper)
    torch_optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in torch_optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def consolidated_state_dict(ckpt_dir: str | Path, tag: str, stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 (stage >= 1: from the fp32 master shards) model weights of a checkpoint tag."""
    check_pickles(Path(ckpt_dir) / tag)
    if stage >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(sys.stderr):  # it prints progress to stdout
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    else:
        sd = load_pickle(Path(ckpt_dir) / tag / "mp_rank_00_model_states.pt")["module"]
    return {k: v.float() for k, v in sd.items()}


# --- safe loading
# torch.load(weights_only=False), as DeepSpeed reads its files, runs whatever code a pickle
# names. Before any of a tag's files is unpickled that way, each is read with torch's
# weights_only unpickler (memory-mapped: the tensors are not read), allowing tensors, plain
# containers and exactly the DeepSpeed types its tags hold (found by loading ZeRO-0..3 fp32
# and bf16 tags: the ZeRO optimizer shards pickle the loss scaler, the ZeRO stage enum and
# fragment addresses). Anything else is refused unless the user trusts the checkpoint
# (`checkpoint.trust_pickles`, --trust-checkpoint).


class UntrustedCheckpoint(ValueError):
    """A checkpoint file holds pickled objects that could run code when loaded."""


def _checkpoint_globals() -> list[Any]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_pickle(path: Path, mmap: bool = False) -> Any:
    """torch.load of a checkpoint file: tensors, containers and DeepSpeed's types only,
    unless the user trusts checkpoints; UntrustedCheckpoint names the file otherwise."""
    if checkpoint.pickles_trusted():
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(_checkpoint_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = found.group(1) if found else str(e).splitlines()[0]
        raise UntrustedCheckpoint(
            f"{path} holds pickled objects other than tensors and DeepSpeed's checkpoint "
            f"types ({what}); loading it could run code. If you trust where this checkpoint "
            "came from, pass --trust-checkpoint"
        ) from None


def check_pickles(tag_dir: Path) -> None:
    """Refuse a tag any of whose files would unpickle more than `load_pickle` allows, before
    DeepSpeed (weights_only=False) reads them."""
    if not checkpoint.pickles_trusted():
        for f in sorted(tag_dir.rglob("*.pt")):
            load_pickle(f, mmap=True)


# --- ops (dsfm doctor)
# Which of DeepSpeed's compiled ops a run loads, and whether each is ready here, asked of
# DeepSpeed the way `ds_report` and `OpBuilder.load` decide it, without building anything.
# `dsfm.doctor` turns the answers into its report and into the train preflight. (Imports stay
# inside the functions so this section is self-contained at the end of the module.)
#
# The rule reads the DeepSpeed config alone (DeepSpeed 0.19.8):
#   ShareMemCommBuilder  the CPU accelerator's shared-memory collectives: every CPU run, from
#                        deepspeed.init_distributed (comm/torch.py build_shm_op), when compatible
#   CPUAdamBuilder       optimizer offload to cpu or nvme (DeepSpeedCPUAdam); without offload
#                        dsfm's optimizer is torch's AdamW, which needs no DeepSpeed op
#   AsyncIOBuilder       offload of optimizer or parameters to nvme (runtime/swap_tensor); its
#                        load() loads PinMemoryBuilder first


def ops_needed(ds: dict[str, Any]) -> list[tuple[str, str]]:
    """(op builder class, why the run loads it) for a run of DeepSpeed config `ds` here."""
    from deepspeed.ops.op_builder.builder import probe_is_compatible

    zero = ds.get("zero_optimization") or {}
    opt_device = str((zero.get("offload_optimizer") or {}).get("device", "none")).lower()
    param_device = str((zero.get("offload_param") or {}).get("device", "none")).lower()
    ops = []
    comm = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if comm is not None and _quietly(probe_is_compatible, comm):
        ops.append(("ShareMemCommBuilder", "CPU collectives, loaded by deepspeed.init_distributed"))
    if opt_device in ("cpu", "nvme"):
        ops.append(("CPUAdamBuilder", f"optimizer offload to {opt_device}: DeepSpeedCPUAdam"))
    if "nvme" in (opt_device, param_device):
        ops.append(("PinMemoryBuilder", "NVMe offload: async_io loads it first"))
        ops.append(("AsyncIOBuilder", "NVMe offload: swapping to disk"))
    return ops


def toolchain() -> dict[str, Any]:
    """What DeepSpeed's JIT builds with: torch's C++ compiler (CXX, else c++), ninja, nvcc
    (torch's CUDA_HOME), and the torch extensions cache the builds land in."""
    import shutil

    from torch.utils import cpp_extension

    cxx = cpp_extension.get_cxx_compiler()
    cuda_home = cpp_extension.CUDA_HOME
    nvcc = Path(cuda_home, "bin", "nvcc") if cuda_home else None
    nvcc_found = nvcc is not None and nvcc.is_file()
    release = _first_line([str(nvcc), "--version"], r"release (\d+\.\d+)") if nvcc_found else None
    return {
        "cxx": cxx,
        "cxx_from_env": "CXX" in os.environ,
        "cxx_path": shutil.which(cxx),
        "cxx_version": _first_line([cxx, "--version"]),
        "ninja_path": shutil.which("ninja"),
        "ninja_version": _first_line(["ninja", "--version"]),
        "cuda_home": cuda_home,
        "nvcc_path": str(nvcc) if nvcc_found else None,
        "nvcc_version": release,
        "extensions_dir": str(extensions_dir()),
    }


def extensions_dir() -> Path:
    """torch's JIT build root, as `torch.utils.cpp_extension._get_build_directory` computes
    it (repeated here because that function creates the directory)."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is not None:
        return Path(root)
    if torch.version.hip is not None:
        device = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        device = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        device = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(cpp_extension.get_default_build_root()) / f"{python}_{device}"


def installed_ops() -> list[str]:
    """The ops compiled into this DeepSpeed install for this accelerator (usually none: a
    pip install builds each on first use)."""
    from deepspeed.git_version_info import accelerator_name as built_for
    from deepspeed.git_version_info import installed_ops as built

    if built_for != get_accelerator()._name:
        return []
    return sorted(name for name, yes in built.items() if yes)


def op_status(builder_class: str) -> dict[str, Any]:
    """How a run would get one op here: {"op", "status", "where", "missing": [(problem, fix)]}.

    status: "prebuilt" (compiled into the DeepSpeed install for this accelerator and torch),
    "built" (in the torch extensions cache, and ninja finds nothing to redo), "buildable"
    (`OpBuilder.jit_load` can compile it: compatible, ninja, a C++ compiler, nvcc for a CUDA
    op), or "missing" (it cannot be loaded; `missing` says what is absent and the fix).
    """
    from deepspeed.git_version_info import torch_info
    from deepspeed.ops.op_builder.builder import CUDAOpBuilder, OpBuilder, probe_is_compatible

    acc = get_accelerator()
    builder = acc.create_op_builder(builder_class)
    if builder is None or builder.name == "deepspeed_not_implemented":
        problem = f"DeepSpeed has no {builder_class} for the {acc._name} accelerator"
        return _status(builder_class, "missing", missing=[(problem, "use a config without it")])
    name = builder.name
    if name in installed_ops():
        # OpBuilder.load takes the installed op and never falls back to a JIT build
        try:
            OpBuilder.validate_torch_version(torch_info)
            if torch.cuda.is_available() and isinstance(builder, CUDAOpBuilder):
                OpBuilder.validate_torch_op_version(torch_info)
        except RuntimeError as e:
            fix = (
                f"{sys.executable} -m pip install --force-reinstall --no-deps --no-cache-dir "
                f"deepspeed=={deepspeed.__version__}"
            )
            return _status(
                name, "missing", missing=[(f"{name} is prebuilt for another torch: {e}", fix)]
            )
        return _status(name, "prebuilt", builder.absolute_name())

    # OpBuilder.jit_load: is_compatible and ninja first, then torch's build in the cache
    tc = toolchain()
    missing = []
    if not _quietly(probe_is_compatible, builder):
        missing.append(_incompatible(name, builder.error_log))
    if not tc["ninja_path"]:
        missing.append(
            (
                "ninja is not on PATH (every JIT load runs it)",
                f"{sys.executable} -m pip install ninja",
            )
        )
    if torch.cuda.is_available() and isinstance(builder, CUDAOpBuilder) and not tc["nvcc_path"]:
        # jit_load asks nvcc for its version even when the build is cached
        problem = f"{name} is a CUDA op and nvcc was not found (CUDA_HOME={tc['cuda_home']})"
        missing.append(
            (problem, f"install the CUDA toolkit {torch.version.cuda} and set CUDA_HOME to it")
        )
    build_dir = Path(tc["extensions_dir"]) / name
    if missing:
        return _status(name, "missing", missing=missing)
    cache = _cache_state(build_dir, name, tc["ninja_path"])
    if cache == "ready":
        return _status(name, "built", str(build_dir), cache=cache)
    if tc["cxx_path"]:
        return _status(name, "buildable", str(build_dir), cache=cache)
    source = "CXX" if tc["cxx_from_env"] else "torch's default C++ compiler"
    problem = f"no C++ compiler to build {name}: `{tc['cxx']}` ({source}) is not on PATH"
    if cache == "stale":
        problem += f", and the cached build in {build_dir} is out of date"
    fix = _install_hint("g++", "gcc-c++") + ", or set CXX to a C++ compiler's path"
    return _status(name, "missing", missing=[(problem, fix)])


def precision_supported(precision: str) -> bool:
    """DeepSpeed's own check at initialize (engine `_do_sanity_check`): bf16/fp16 on this
    accelerator. On CUDA it asks about this rank's GPU, so no context is made on GPU 0."""
    acc = get_accelerator()
    check = {"bf16": acc.is_bf16_supported, "fp16": acc.is_fp16_supported}.get(precision)
    if check is None:
        return True
    if accelerator_name() == "cuda" and torch.cuda.is_available():
        with torch.cuda.device(min(local_rank(), torch.cuda.device_count() - 1)):
            return bool(check())
    return bool(check())


def _status(
    op: str, status: str, where: str | None = None, missing: list | None = None, cache: str = ""
) -> dict:
    return {"op": op, "status": status, "where": where, "missing": missing or [], "cache": cache}


def _cache_state(build_dir: Path, name: str, ninja: str | None) -> str:
    """Whether a cached build loads as is ("ready"), would be rebuilt on load ("stale":
    another torch, DeepSpeed or ninja built it, or a source changed), or is not there."""
    import subprocess

    from torch.utils import cpp_extension

    lib = build_dir / f"{name}{getattr(cpp_extension, 'LIB_EXT', '.so')}"
    build_file = build_dir / "build.ninja"
    if not (lib.is_file() and build_file.is_file()):
        return "absent"
    # torch rewrites build.ninja before running ninja: another install's paths mean a rebuild
    text = build_file.read_text(errors="replace")
    ours = [cpp_extension.include_paths()[0], str(Path(deepspeed.__file__).parent)]
    if not ninja or not all(path in text for path in ours):
        return "stale"
    # ninja's own answer (sources, headers, command lines; a dry run writes nothing)
    try:
        dry = subprocess.run(
            [ninja, "-n"], cwd=build_dir, capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return "stale"
    return "ready" if dry.returncode == 0 and "no work to do" in dry.stdout else "stale"


def _incompatible(name: str, error_log: str | None) -> tuple[str, str]:
    if name == "async_io":
        return (
            "async_io needs libaio (headers and library), and a C compiler to find it",
            _install_hint("libaio-dev", "libaio-devel")
            + "; if it is installed elsewhere, set CFLAGS=-I<dir>/include LDFLAGS=-L<dir>/lib",
        )
    reason = f": {error_log}" if error_log else ""
    return (f"DeepSpeed finds {name} incompatible here{reason}", "run `ds_report` for details")


def _install_hint(apt: str, dnf: str) -> str:
    import shutil

    if shutil.which("apt-get"):
        return f"apt-get install {apt}"
    if shutil.which("dnf") or shutil.which("yum"):
        return f"dnf install {dnf}"
    return f"install {apt} (Debian/Ubuntu) or {dnf} (RHEL/Fedora)"


def _quietly(fn: Any, *args: Any) -> Any:
    """DeepSpeed's probes print warnings; the report says what matters in its own words."""
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def _first_line(cmd: list[str], pattern: str | None = None) -> str | None:
    """A tool's first output line (or `pattern`'s group 1 in its output); None if it fails."""
    import re
    import subprocess

    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    if pattern:
        match = re.search(pattern, out.stdout)
        return match.group(1) if match else None
    lines = out.stdout.strip().splitlines()
    return lines[0] if lines else None
