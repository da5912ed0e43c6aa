"""The one module that imports deepspeed: the process group, the engine, its checkpoints.

The DeepSpeed config arrives filled (`dsfm.config.deepspeed.fill_ds_config`); here it is
run: `initialize` wraps the model with its optimizer (decay on matrices only) and the
WarmupCosineLR schedule, and the few places dsfm reaches past the engine's public API are
named and explained (`step` for ZeRO-0 in fp32, `set_lr_scale` for rollbacks, the
universal-checkpoint load for re-sharding).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dsfm.config.deepspeed import zero_stage
from dsfm.distributed.env import local_rank, rank

os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

import deepspeed  # noqa: E402  (DS_ACCELERATOR must be set before import)
from deepspeed.accelerator import get_accelerator  # noqa: E402
from deepspeed.utils import logger as ds_logger  # noqa: E402

ds_logger.setLevel(os.environ.get("DSFM_DS_LOG_LEVEL", "WARNING"))
# WarmupCosineLR warns when DeepSpeed itself reads the LR before the first step; not ours to fix.
ds_logger.addFilter(lambda record: "before it has started" not in record.getMessage())


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
    deepspeed.init_distributed(dist_backend=backend, verbose=False, **kwargs)


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
    """Wrap the model in a DeepSpeed engine (optimizer and scheduler built from `ds`).

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


def base_lrs(engine: Any) -> list[float]:
    """The peak LRs the WarmupCosineLR schedule scales (one per param group)."""
    return list(engine.lr_scheduler.org_lrs)


def set_lr_scale(engine: Any, base: list[float], scale: float) -> None:
    """Scale the whole schedule (a rollback's lower LR) and re-apply it at the current step.

    WarmupCosineLR's state_dict holds only its position, so the scale lives in our client
    state and is set again after every load.
    """
    sched = engine.lr_scheduler
    sched.org_lrs = [lr * scale for lr in base]
    sched.step(sched.last_batch_iteration)


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
    `undo_schedule_step`. `grad_norm` is `grad_norm_before_step` at the accumulation
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


def undo_schedule_step(engine: Any) -> None:
    """After an update `step` skipped on the device: the LR schedule one step back and the
    skip counted, as DeepSpeed does for the updates it skips itself."""
    sched = engine.lr_scheduler
    sched.step(sched.last_batch_iteration - 1)
    engine.skipped_steps += 1


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
    if stage >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(sys.stderr):  # it prints progress to stdout
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    else:
        states = torch.load(
            Path(ckpt_dir) / tag / "mp_rank_00_model_states.pt",
            map_location="cpu",
            weights_only=False,
        )
        sd = states["module"]
    return {k: v.float() for k, v in sd.items()}
