"""`dsfm plan`: what a run will cost before it runs: parameters, FLOPs, tokens, time, memory.

Pure arithmetic on the training config and the ds_configs/ recipes (no torch, no
deepspeed), so it answers in about a second anywhere. Every assumption is in ASSUMPTIONS
and printed under the table; the tests check the model-state terms against what real
DeepSpeed holds per rank and the activation terms against autograd's saved tensors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from typing import Any

from dsfm.config.deepspeed import precision as ds_precision
from dsfm.config.deepspeed import read_ds_config
from dsfm.config.load import find_recipe, load_config
from dsfm.config.resolve import train_samples
from dsfm.config.schema import Config
from dsfm.data.format import META_FILE, read_meta_file
from dsfm.gpus import find_gpu
from dsfm.model.config import ModelConfig
from dsfm.model.sizes import block_params, flops_per_token, num_params
from dsfm.observe.numbers import duration, human

GIB = 2**30
OVERHEAD_BYTES = 1 * GIB  # CUDA context, cuBLAS workspaces, allocator fragmentation
HOST_BYTES_PER_RANK = 2 * GIB  # one Python process with torch and deepspeed loaded
FIT_FRACTION = 0.9  # a setup fits when its estimate is within 90% of the GPU's memory
CHINCHILLA_TOKENS_PER_PARAM = 20
RECOMPUTE_FACTOR = 8 / 6  # checkpointing re-runs the forward: 2N more FLOPs on top of 6N

# (recipe under ds_configs/, ZeRO stage, optimizer in CPU RAM, parameters in CPU RAM)
VARIANTS = [
    ("zero0", 0, False, False),
    ("zero1", 1, False, False),
    ("zero2", 2, False, False),
    ("zero3", 3, False, False),
    ("zero2_offload", 2, True, False),
    ("zero3_offload", 3, True, True),
]
# Cheapest first: plain data parallel, then checkpointing, then ZeRO-3, then offload. Within a
# tier the setup with the largest micro-batch wins, then the lower stage.
TIERS = [
    (["zero0", "zero1", "zero2"], False),
    (["zero0", "zero1", "zero2"], True),
    (["zero3"], False),
    (["zero3"], True),
    (["zero2_offload"], False),
    (["zero2_offload"], True),
    (["zero3_offload"], False),
    (["zero3_offload"], True),
]

ASSUMPTIONS = [
    "model states (ZeRO paper): bf16/fp16 = 2 B/param weights + 2 grads + 12 fp32 master and "
    "Adam moments; fp32 = 4 + 4 + 8 Adam, plus 4 of fp32 master that DeepSpeed's ZeRO-1/2/3 "
    "optimizers clone even from fp32 weights (measured, DeepSpeed 0.19.8; ZeRO-0 has none). "
    "ZeRO-1 shards the optimizer over the GPUs, ZeRO-2 also the grads, ZeRO-3 also the weights",
    "offload: zero2_offload keeps optimizer states, fp32 grads and a bf16 copy of its weight "
    "partition in CPU RAM, weights on the GPU; zero3_offload also keeps the weights in CPU "
    "RAM and gathers them per module",
    "buffers (from the recipe JSON, allocated at full size however small the model): during "
    "backward ZeRO-1/2 hold 1 reduce bucket of reduce_bucket_size grads (2 with overlap_comm), "
    "ZeRO-3 holds 1 always, plus its gathered weights (largest module + prefetch bucket + "
    "params under the persistence threshold)",
    "activations: kernels=auto/triton means the GPU path with Triton installed (its RMSNorm, "
    "SwiGLU and RoPE kernels; "
    "FlashAttention keeps q, k, v, output and log-sum-exp, never the T x T scores); "
    "kernels=torch the PyTorch fallbacks (RMSNorm keeps an fp32 copy, SwiGLU keeps silu(gate))",
    "activations: the LM head computes the loss in token chunks, so one chunk of fp32 logits "
    "(about tokens x d_model values) exists at a time, never tokens x vocab; with "
    "checkpointing only block inputs are kept, plus one block recomputed during backward; "
    "gradients of activations in backward are not counted",
    f"fixed overhead {OVERHEAD_BYTES / GIB:.0f} GiB per GPU (CUDA context, allocator); fits = "
    f"total <= {FIT_FRACTION:.0%} of the GPU memory; CPU RAM per node adds "
    f"{HOST_BYTES_PER_RANK / GIB:.0f} GiB per process",
    f"time = total FLOPs / (GPUs x peak bf16 FLOP/s x MFU), FLOPs = (6N + 12LdT) per token "
    f"(N non-embedding params); checkpointing multiplies it by {RECOMPUTE_FACTOR:.2f}",
]


@dataclasses.dataclass
class Hardware:
    gpu: str
    "Card name from dsfm.gpus, or 'custom' for --gpu-mem."
    n_gpus: int
    "GPUs in the job."
    memory_bytes: float
    "Memory of one GPU."
    peak_flops: float | None
    "Dense bf16 peak per GPU; None when unknown (no time estimate)."
    gpus_per_node: int
    "GPUs per node (CPU RAM for offload is per node)."


def bytes_per_value(precision: str) -> int:
    """Bytes of a weight, gradient or activation in the training precision."""
    return 4 if precision == "fp32" else 2


def model_state_bytes(
    n_params: int,
    precision: str,
    stage: int,
    n_gpus: int,
    offload_optimizer: bool = False,
    offload_params: bool = False,
) -> dict[str, float]:
    """Per-GPU bytes of weights, gradients and optimizer states, and per-rank CPU bytes."""
    mixed = precision != "fp32"
    p = bytes_per_value(precision)
    master = 4 if mixed or stage >= 1 else 0  # ZeRO clones an fp32 master even in fp32
    params = n_params * p / (n_gpus if stage >= 3 else 1)
    grads = n_params * p / (n_gpus if stage >= 2 else 1)
    optimizer = n_params * (master + 8) / (n_gpus if stage >= 1 else 1)
    cpu = 0.0
    if offload_optimizer:  # grads leave the GPU through the reduce bucket into fp32 on the CPU
        cpu += optimizer + n_params * 4 / n_gpus
        if stage < 3:  # ZeRO-2 stages the updated partition in low precision on the CPU too
            cpu += n_params * p / n_gpus
        optimizer = grads = 0.0
    if offload_params:
        cpu += params
        params = 0.0
    return {"params": params, "grads": grads, "optimizer": optimizer, "cpu": cpu}


def activation_bytes(
    m: ModelConfig, micro_batch: int, seq_len: int, precision: str, checkpointing: bool
) -> dict[str, float]:
    """Bytes of one micro-batch's activations: `saved` (kept by the forward for backward)
    and `peak` (saved plus the largest transient: a logits chunk or a recomputed block)."""
    m = m.checked()
    a = bytes_per_value(precision)
    n = micro_batch * seq_len  # tokens
    d, f, heads = m.d_model, m.ffn_hidden, m.n_heads
    d_kv = m.n_kv_heads * m.head_dim
    torch_ops = m.kernels == "torch"
    # RMSNorm keeps its input and 1/rms (fp32); the fallback keeps x in fp32 plus x/rms.
    norm = (4 + a) * d + 4 if torch_ops else a * d + 4
    layer = n * (
        2 * norm
        + 2 * a * d  # normalised inputs of q/k/v and gate/up
        + a * (2 * d + 2 * d_kv)
        + 4 * heads  # attention: q, output (o_proj input), k, v, lse
        + a * f * (4 if torch_ops else 3)  # gate, up, (silu(gate),) down_proj input
    )
    head = n * (norm + a * d + 4 + 8 + 8)  # final norm, lm_head input, lse; labels, ids
    rope = 2 * seq_len * m.head_dim * 4  # cos, sin in fp32: checkpoint inputs, or shared
    if torch_ops and a != 4 and not checkpointing:  # the fallback's casts per q and k, per layer
        rope = m.n_layers * 2 * 2 * seq_len * m.head_dim * a
    blocks = m.n_layers * (n * a * d if checkpointing else layer)
    chunk = max(1, min(n, math.ceil(n * d / m.vocab_size)))  # linear_cross_entropy's default
    logits = chunk * m.vocab_size * 4
    saved = blocks + head + rope
    # The logits chunk lives in the head's backward, the recomputed block later: never both.
    return {"saved": saved, "peak": saved + max(logits, layer if checkpointing else 0)}


def bucket_bytes(zero: dict[str, Any], stage: int, precision: str) -> float:
    """Gradient reduce buckets the recipe's zero_optimization section makes DeepSpeed allocate
    (at full reduce_bucket_size, however small the model)."""
    size = float(zero.get("reduce_bucket_size", 5e8)) * bytes_per_value(precision)
    contiguous = zero.get("contiguous_gradients", True) or "offload_optimizer" in zero
    if stage in (1, 2) and contiguous:
        return size * (2 if zero.get("overlap_comm", False) else 1)  # double-buffered
    if stage == 3 and contiguous:
        return size
    return 0.0


def gathered_bytes(zero: dict[str, Any], stage: int, precision: str, m: ModelConfig) -> float:
    """ZeRO-3's whole weights on the GPU at a time: the module being computed (the largest:
    a block or the embedding), the prefetch bucket and the small params it never shards."""
    if stage != 3:
        return 0.0
    largest = max(block_params(m), m.vocab_size * m.d_model)
    prefetch = min(float(zero.get("stage3_prefetch_bucket_size", 5e7)), num_params(m))
    threshold = float(zero.get("stage3_param_persistence_threshold", 1e5))
    persistent = (2 * m.n_layers + 1) * m.d_model if m.d_model < threshold else 0  # norms
    return (largest + prefetch + persistent) * bytes_per_value(precision)


def _row(
    cfg: Config,
    recipe: dict[str, Any],
    variant: tuple,
    precision: str,
    hw: Hardware,
    micro_batch: int,
    checkpointing: bool,
) -> dict[str, Any]:
    name, stage, off_opt, off_params = variant
    m = cfg.model
    states = model_state_bytes(num_params(m), precision, stage, hw.n_gpus, off_opt, off_params)
    act = activation_bytes(m, micro_batch, cfg.train.seq_len, precision, checkpointing)
    zero = recipe.get("zero_optimization", {})
    buffers = bucket_bytes(zero, stage, precision) + gathered_bytes(zero, stage, precision, m)
    model_states = states["params"] + states["grads"] + states["optimizer"]
    total = model_states + act["peak"] + buffers + OVERHEAD_BYTES
    per_node = min(hw.n_gpus, hw.gpus_per_node)
    cpu = (states["cpu"] + HOST_BYTES_PER_RANK) * per_node
    return {
        "variant": name,
        "checkpointing": checkpointing,
        "micro_batch": micro_batch,
        "params_bytes": states["params"],
        "grads_bytes": states["grads"],
        "optimizer_bytes": states["optimizer"],
        "model_states_bytes": model_states,
        "activations_bytes": act["peak"],
        "buffers_bytes": buffers + OVERHEAD_BYTES,
        "total_bytes": total,
        "cpu_bytes_per_node": cpu,
        "fits": total <= FIT_FRACTION * hw.memory_bytes,
    }


def _vocab(cfg: Config, default: int) -> tuple[int, str]:
    if cfg.model.vocab_size > 0:
        return cfg.model.vocab_size, "model.vocab_size"
    sizes = {}
    for _, path, _ in cfg.data.sources():
        try:
            sizes[path] = int(read_meta_file(path)["vocab_size"])
        except (FileNotFoundError, ValueError):
            continue  # the data need not exist yet
    if sizes:
        return max(sizes.values()), f"from {', '.join(sizes)}/{META_FILE}"
    where = cfg.data.path or "data.path"
    return default, f"assumed, --vocab-size: no model.vocab_size and no {META_FILE} in {where}"


def make_plan(
    cfg: Config,
    recipes: dict[str, dict[str, Any]],
    precision: str,
    hw: Hardware,
    *,
    tokens: int | None = None,
    mfu: float = 0.4,
    vocab_size: int = 32000,
    config_path: str | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Every number `dsfm plan` shows. `recipes`: name -> ds_configs/<name>.json contents;
    `config_path` and `overrides` go into the recommended command line."""
    if hw.n_gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {hw.n_gpus}")
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu must be in (0, 1], got {mfu} (0.4 is typical for dense LMs)")
    if tokens is not None and tokens < 1:
        raise ValueError(f"--tokens must be >= 1, got {tokens}")
    vocab, vocab_source = _vocab(cfg, vocab_size)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab).checked())
    t = cfg.train
    global_batch = t.global_batch_size or t.micro_batch_size * t.grad_accum * hw.n_gpus
    if global_batch % hw.n_gpus:
        raise ValueError(
            f"global batch {global_batch} (train.global_batch_size) does not split over "
            f"{hw.n_gpus} GPUs; pick a multiple of the GPU count"
        )
    planned, source = tokens, "--tokens"
    if tokens is None and t.epochs is not None:
        try:
            samples = train_samples(cfg)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(
                f"train.epochs={t.epochs}: cannot count the training samples ({e}); "
                "point data.path at the prepared dataset or pass --tokens"
            ) from None
        planned, source = t.epochs * samples * t.seq_len, "train.epochs x samples x seq_len"
    elif tokens is None:
        planned, source = (
            t.max_steps * global_batch * t.seq_len,
            "max_steps x global batch x seq_len",
        )
    n_params, n_non_emb = num_params(cfg.model), num_params(cfg.model, non_embedding=True)
    fpt = flops_per_token(cfg.model, t.seq_len)
    time_s = None
    if hw.peak_flops:
        time_s = fpt * planned / (hw.n_gpus * hw.peak_flops * mfu)

    rows = [
        _row(cfg, recipes[v[0]], v, precision, hw, t.micro_batch_size, ckpt)
        for v in VARIANTS
        for ckpt in (False, True)
    ]
    rec = recommend(cfg, recipes, precision, hw, global_batch // hw.n_gpus)
    if rec is not None and time_s is not None:
        rec["time_s"] = time_s * (RECOMPUTE_FACTOR if rec["checkpointing"] else 1.0)
    plan = {
        "model": {
            "params": n_params,
            "non_embedding_params": n_non_emb,
            "vocab_size": vocab,
            "vocab_source": vocab_source,
            "n_layers": cfg.model.n_layers,
            "d_model": cfg.model.d_model,
            "n_heads": cfg.model.n_heads,
            "n_kv_heads": cfg.model.n_kv_heads,
            "tie_embeddings": cfg.model.tie_embeddings,
        },
        "precision": precision,
        "hardware": dataclasses.asdict(hw),
        "batch": {
            "global": global_batch,
            "micro": t.micro_batch_size,
            "grad_accum": t.grad_accum,
            "seq_len": t.seq_len,
        },
        "flops_per_token": fpt,
        "tokens": planned,
        "tokens_source": source,
        "total_flops": fpt * planned,
        "chinchilla_tokens": CHINCHILLA_TOKENS_PER_PARAM * n_params,
        "mfu": mfu,
        "time_s": time_s,
        "rows": rows,
        "recommendation": rec,
        "assumptions": ASSUMPTIONS,
    }
    if rec is not None:
        rec["command"] = command(plan, config_path, overrides or [])
    plan["verdict"] = _verdict(plan)
    return plan


def recommend(
    cfg: Config, recipes: dict[str, dict[str, Any]], precision: str, hw: Hardware, per_gpu: int
) -> dict[str, Any] | None:
    """The cheapest tier that fits, at the largest power-of-two micro-batch dividing the
    per-GPU batch (so micro x accum x GPUs stays the global batch); None if nothing fits."""
    micros = [2**k for k in range(per_gpu.bit_length() - 1, -1, -1) if per_gpu % 2**k == 0]
    variants = {v[0]: v for v in VARIANTS}
    for names, ckpt in TIERS:
        for micro in micros:
            for name in names:
                row = _row(cfg, recipes[name], variants[name], precision, hw, micro, ckpt)
                if row["fits"]:
                    return {**row, "grad_accum": per_gpu // micro}
    return None


def command(plan: dict[str, Any], config_path: str | None, overrides: list[str]) -> str:
    """The launcher line that runs the recommended setup."""
    rec, hw = plan["recommendation"], plan["hardware"]
    per_node = min(hw["n_gpus"], hw["gpus_per_node"])
    nodes = math.ceil(hw["n_gpus"] / per_node)
    launch = f"deepspeed --num_gpus {per_node}"
    if nodes > 1:
        launch = f"deepspeed --num_nodes {nodes} --num_gpus {per_node} --hostfile HOSTFILE"
    ours = ("train.micro_batch_size=", "train.grad_accum=", "model.activation_checkpointing=")
    kept = [o for o in overrides if not o.startswith(ours)]
    parts = [launch, "launchers/pretrain.py", f"--ds ds_configs/{rec['variant']}.json"]
    if config_path:
        parts.append(f"--config {config_path}")
    parts += kept
    if plan["precision"] != "bf16" and not any(o.startswith("train.precision=") for o in kept):
        parts.append(f"train.precision={plan['precision']}")  # the recipes say bf16
    parts += [
        f"train.micro_batch_size={rec['micro_batch']}",
        f"train.grad_accum={rec['grad_accum']}",
    ]
    if rec["checkpointing"]:
        parts.append("model.activation_checkpointing=true")
    return " ".join(parts)


def _verdict(plan: dict[str, Any]) -> str:
    hw, rec = plan["hardware"], plan["recommendation"]
    if rec is not None:
        how = "with activation checkpointing" if rec["checkpointing"] else "no checkpointing"
        return (
            f"use {rec['variant']} ({how}), micro-batch {rec['micro_batch']} x grad_accum "
            f"{rec['grad_accum']} x {hw['n_gpus']} GPUs = global batch {plan['batch']['global']}; "
            f"about {rec['total_bytes'] / GIB:.1f} of {hw['memory_bytes'] / GIB:.0f} GiB per GPU"
        )
    return (
        f"does not fit on {hw['n_gpus']}x {hw['gpu']} ({hw['memory_bytes'] / GIB:.0f} GiB) even "
        "with zero3_offload, activation checkpointing and micro-batch 1; use more GPUs, a "
        "larger card, a shorter train.seq_len or a smaller model"
    )


def gib(n: float) -> str:
    """The table's format for a byte count (tests parse it back)."""
    return f"{n / GIB:.2f}"


def print_plan(plan: dict[str, Any], console: Any) -> None:
    """The header block, one table row per ZeRO recipe x checkpointing, the recommendation."""
    from rich.table import Table

    m, hw, b = plan["model"], plan["hardware"], plan["batch"]
    mem = hw["memory_bytes"] / GIB
    lines = [
        f"model      {human(m['params'])} parameters ({human(m['non_embedding_params'])} "
        f"non-embedding), {m['n_layers']} layers x {m['d_model']} wide, {m['n_heads']} heads "
        f"({m['n_kv_heads']} kv), vocab {m['vocab_size']:,} ({m['vocab_source']})"
        + (", tied embeddings" if m["tie_embeddings"] else ""),
        f"batch      global {b['global']} sequences x {b['seq_len']} tokens "
        f"(configured micro {b['micro']} x accum {b['grad_accum']}); precision {plan['precision']}",
        f"FLOPs      {plan['flops_per_token']:.3g} per token; {plan['total_flops']:.3g} for "
        f"{human(plan['tokens'])} tokens ({plan['tokens_source']})",
        f"Chinchilla {human(plan['chinchilla_tokens'])} tokens (20 x {human(m['params'])} "
        f"total parameters); planned = {plan['tokens'] / plan['chinchilla_tokens']:.2f}x that",
    ]
    gpu = f"{hw['n_gpus']}x {hw['gpu']} ({mem:.0f} GiB)"
    if plan["time_s"] is None:
        lines.append(f"time       unknown: no peak FLOP/s for {gpu} (pass --gpu NAME)")
    else:
        lines.append(
            f"time       {duration(plan['time_s'])} on {gpu} at {plan['mfu']:.0%} MFU "
            f"({hw['peak_flops'] / 1e12:.0f} TFLOP/s bf16 peak per GPU)"
        )
    for line in lines:
        console.print(line, markup=False, highlight=False)

    table = Table(
        title=f"memory per GPU at micro-batch {b['micro']} (GiB; fits: total <= "
        f"{FIT_FRACTION:.0%} of {mem:.0f})",
        caption="states = weights + grads + optimizer; buffers = communication buckets, "
        "ZeRO-3 gathered weights and the fixed overhead; CPU = RAM per node",
    )
    headers = ["recipe", "ckpt", "weights", "grads", "optim", "states", "activ"]
    for col in [*headers, "buffers", "total", "CPU", "fits"]:
        table.add_column(col, justify="left" if col in ("recipe", "ckpt") else "right")
    keys = ["params_bytes", "grads_bytes", "optimizer_bytes", "model_states_bytes"]
    keys += ["activations_bytes", "buffers_bytes", "total_bytes", "cpu_bytes_per_node"]
    for r in plan["rows"]:
        table.add_row(
            r["variant"],
            "yes" if r["checkpointing"] else "no",
            *(gib(r[k]) for k in keys),
            "[green]yes[/]" if r["fits"] else "[red]no[/]",
        )
    console.print(table)
    rec = plan["recommendation"]
    style = "bold green" if rec else "bold red"
    console.print(f"recommendation: {plan['verdict']}", style=style, markup=False, highlight=False)
    if rec:
        if rec.get("time_s") is not None:
            console.print(f"  time with it: {duration(rec['time_s'])}", markup=False)
        console.print(f"  {rec['command']}", markup=False, highlight=False, soft_wrap=True)
    console.print("assumptions:", style="dim")
    for a in plan["assumptions"]:
        console.print(f"  - {a}", style="dim", markup=False, highlight=False)


def plan_command(
    config: str | None,
    ds: str,
    gpus: int,
    gpus_per_node: int | None,
    gpu: str | None,
    gpu_mem: float | None,
    tokens: float | None,
    mfu: float,
    vocab_size: int,
    as_json: bool,
    overrides: list[str],
) -> int:
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    if gpus_per_node is not None and gpus_per_node < 1:
        raise ValueError(f"--gpus-per-node must be >= 1, got {gpus_per_node}")
    if gpu_mem is not None and gpu_mem <= 0:
        raise ValueError(f"--gpu-mem must be > 0 GiB, got {gpu_mem}")
    gpu = gpu or ("H100" if gpu_mem is None else None)  # the header names the card
    name, peak, memory = find_gpu(gpu) if gpu else ("custom", None, gpu_mem)
    hw = Hardware(
        gpu=name,
        n_gpus=gpus,
        memory_bytes=(gpu_mem or memory) * GIB,
        peak_flops=peak,
        gpus_per_node=gpus_per_node or min(gpus, 8),
    )
    config_path = find_recipe(config, "configs") if config else None
    cfg = load_config(config_path, overrides, world_size=gpus)
    recipes = {v[0]: read_ds_config(find_recipe(v[0], "ds_configs")) for v in VARIANTS}
    plan = make_plan(
        cfg,
        recipes,
        cfg.train.precision or ds_precision(read_ds_config(find_recipe(ds, "ds_configs"))),
        hw,
        tokens=int(tokens) if tokens is not None else None,
        mfu=mfu,
        vocab_size=vocab_size,
        config_path=config,
        overrides=overrides,
    )
    if as_json:
        print(json.dumps(plan))
    else:
        from rich.console import Console

        print_plan(plan, Console() if sys.stdout.isatty() else Console(width=120))
    return 0
