"""`dsfm <verb>`: prepare, data, train, finetune, generate, eval, merge, export, import, config,
runs, plot, plan.

Thin: parse arguments, call the package.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dsfm.config import ConfigError

SOURCE_ROOT = Path(__file__).resolve().parents[1]


def find_recipe(path: str) -> str:
    """A recipe path as given, else relative to the dsfm source tree (ds_configs/, configs/)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return str(p)
    candidate = SOURCE_ROOT / p
    return str(candidate) if candidate.exists() else str(p)


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="training config YAML (e.g. configs/smoke.yaml)")
    p.add_argument(
        "--ds",
        default="ds_configs/zero0.json",
        help="DeepSpeed config JSON: how to run (default: ds_configs/zero0.json)",
    )
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="config overrides, e.g. train.max_steps=100 data.path=data/stdlib",
    )


def train_main(args: argparse.Namespace) -> int:
    from dsfm.checkpoint import CheckpointError
    from dsfm.trainer import EXIT_REQUEUE, run

    config = find_recipe(args.config) if args.config else None
    try:
        summary = run(config, find_recipe(args.ds), args.overrides)
    except CheckpointError as e:  # e.g. disk full: the message says what is intact and what to do
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return EXIT_REQUEUE if summary.get("preempted") else 0


def finetune_main(args: argparse.Namespace) -> int:
    from dsfm.config import load_config

    config = find_recipe(args.config) if args.config else None
    if not load_config(config, args.overrides, check_data=False).train.init_from:
        raise ValueError(
            "finetune needs train.init_from=RUN_OR_CHECKPOINT (the model to start "
            "from: a pretraining run, a tag, or a `dsfm import` output)"
        )
    return train_main(args)


def merge_main(args: argparse.Namespace) -> int:
    from dsfm import checkpoint

    ckpt_dir, tag = checkpoint.resolve(args.checkpoint)
    state = checkpoint.client_state(ckpt_dir, tag)
    model, _ = checkpoint.load_model(args.checkpoint)  # LoRA folded in by load_weights
    config = state["config"]
    config["lora"] = {**config.get("lora", {}), "rank": 0}
    plain = {"config": config, "step": state.get("step", 0), "merged_from": str(ckpt_dir / tag)}
    out = checkpoint.save_plain(
        args.out, model.state_dict(), plain, ckpt_dir / tag / "tokenizer.json"
    )
    print(f"wrote {out} (plain checkpoint, LoRA merged) from {ckpt_dir / tag}")
    return 0


def export_main(args: argparse.Namespace) -> int:
    from dsfm.export import export_hf

    out = export_hf(args.checkpoint, args.out, dtype=args.dtype)
    print(f"wrote Hugging Face Llama directory {out}")
    return 0


def import_main(args: argparse.Namespace) -> int:
    from dsfm.export import import_hf

    out = import_hf(args.hf_dir, args.out)
    print(f"wrote {out}: start from it with train.init_from={out}")
    return 0


def eval_main(args: argparse.Namespace) -> int:
    import json

    from dsfm.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.checkpoint,
        args.data,
        split=args.split,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_samples=args.max_samples,
    )
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['split']}: loss {result['loss']:.4f} | ppl {result['ppl']:.2f} | "
            f"bpb {result['bpb']:.4f} | {result['tokens']:,} tokens, {result['samples']} samples"
        )
    return 0


def prepare_main(args: argparse.Namespace) -> int:
    if args.chat:
        from dsfm.finetune import prepare_sft

        if not args.tokenizer or args.tokenizer == "byte":
            raise ValueError(
                "--chat needs --tokenizer PATH: the tokenizer.json of the model you "
                "will fine-tune (a run dir or checkpoint tag holds one)"
            )
        meta = prepare_sft(
            args.input,
            args.out,
            tokenizer=args.tokenizer,
            val_fraction=args.val_fraction,
            seed=args.seed,
            force=args.force,
        )
        return _report_prepare(args.out, meta)
    from dsfm.data.prepare import prepare

    meta = prepare(
        args.input,
        args.out,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        text_key=args.text_key,
        val_fraction=args.val_fraction,
        seed=args.seed,
        max_bytes=args.max_bytes,
        workers=args.workers,
        max_shard_bytes=args.shard_size,
        force=args.force,
    )
    return _report_prepare(args.out, meta)


def parse_size(text: str) -> int:
    """'500MB', '2GiB', '1e9' or '1048576' → bytes."""
    units = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    t = text.strip().upper().removesuffix("B")
    binary = t.endswith("I")
    t = t.removesuffix("I")
    unit = t[-1] if t and t[-1] in "KMGT" else ""
    try:
        number = float(t[: len(t) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 500MB, 2GiB)") from None
    scale = 1024 ** "_KMGT".index(unit) if binary and unit else units[unit]
    return int(number * scale)


def data_stats_main(args: argparse.Namespace) -> int:
    from dsfm.data.stats import print_stats, stats

    print_stats(stats(args.dir, seed=args.seed), args.json)
    return 0


def data_verify_main(args: argparse.Namespace) -> int:
    from dsfm.data.stats import verify

    problems = verify(args.dir)
    for problem in problems:
        print(f"FAIL {problem}")
    if problems:
        print(f"{args.dir}: {len(problems)} problem(s); re-run `dsfm prepare` for this dataset")
        return 1
    print(f"{args.dir}: OK (sizes, checksums, token ids, document offsets)")
    return 0


def _report_prepare(out: str, meta: dict) -> int:
    s = meta["splits"]
    print(
        f"wrote {out}: vocab {meta['vocab_size']}, {meta['dtype']}, "
        f"train {s['train']['tokens']:,} tokens / {s['train']['docs']:,} docs, "
        f"val {s['val']['tokens']:,} tokens / {s['val']['docs']:,} docs"
    )
    return 0


def generate_main(args: argparse.Namespace) -> int:
    from dsfm.checkpoint import load_model
    from dsfm.finetune import prompt_ids
    from dsfm.generate import sample

    model, tokenizer = load_model(args.checkpoint, dtype=args.dtype)
    ids, stop_id = prompt_ids(tokenizer, args.prompt, chat=args.chat)
    new = sample(
        model,
        ids,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        eot_id=stop_id,
        use_cache=not args.no_cache,
    )
    print(tokenizer.decode(new) if args.chat else args.prompt + tokenizer.decode(new))
    return 0


def config_main(args: argparse.Namespace) -> int:
    from dsfm.config import load_config, reference, to_dict

    if args.get is None:
        print(reference())
        return 0
    config = find_recipe(args.config) if args.config else None
    cfg = to_dict(load_config(config, args.overrides, check_data=False))
    section, _, key = args.get.partition(".")
    if section not in cfg or key not in cfg[section]:
        raise ValueError(f"--get {args.get}: no such setting (see `dsfm config`)")
    print(cfg[section][key])
    return 0


def plan_main(args: argparse.Namespace) -> int:
    import json

    from dsfm.config import load_config
    from dsfm.ds_config import precision, read_ds_config
    from dsfm.gpus import find_gpu
    from dsfm.plan import GIB, VARIANTS, Hardware, make_plan, print_plan

    if args.gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {args.gpus}")
    if args.gpus_per_node is not None and args.gpus_per_node < 1:
        raise ValueError(f"--gpus-per-node must be >= 1, got {args.gpus_per_node}")
    if args.gpu_mem is not None and args.gpu_mem <= 0:
        raise ValueError(f"--gpu-mem must be > 0 GiB, got {args.gpu_mem}")
    gpu = args.gpu or ("H100" if args.gpu_mem is None else None)  # the header names the card
    name, peak, memory = find_gpu(gpu) if gpu else ("custom", None, args.gpu_mem)
    hw = Hardware(
        gpu=name,
        n_gpus=args.gpus,
        memory_bytes=(args.gpu_mem or memory) * GIB,
        peak_flops=peak,
        gpus_per_node=args.gpus_per_node or min(args.gpus, 8),
    )
    config = find_recipe(args.config) if args.config else None
    cfg = load_config(config, args.overrides, world_size=args.gpus, check_data=False)
    recipes = {v[0]: read_ds_config(find_recipe(f"ds_configs/{v[0]}.json")) for v in VARIANTS}
    plan = make_plan(
        cfg,
        recipes,
        cfg.train.precision or precision(read_ds_config(find_recipe(args.ds))),
        hw,
        tokens=int(args.tokens) if args.tokens is not None else None,
        mfu=args.mfu,
        vocab_size=args.vocab_size,
        config_path=args.config,
        overrides=args.overrides,
    )
    if args.json:
        print(json.dumps(plan))
    else:
        from rich.console import Console

        print_plan(plan, Console() if sys.stdout.isatty() else Console(width=120))
    return 0


def runs_main(args: argparse.Namespace) -> int:
    import json

    from dsfm.runs import list_runs, print_runs

    described = list_runs(args.dirs, sort=args.sort)
    if args.json:
        print(json.dumps(described, indent=1, ensure_ascii=False))
    elif not described:
        print(
            f"no runs under {', '.join(args.dirs)} (a run directory has metrics.jsonl or "
            "config.yaml; start one with `dsfm train ... train.out_dir=runs/NAME`)"
        )
    else:
        print_runs(described, title=f"{len(described)} run(s) under {', '.join(args.dirs)}")
    return 0


def plot_main(args: argparse.Namespace) -> int:
    from dsfm.plot import plot_runs, save_figure

    fig = plot_runs(args.runs, x=args.x, smooth=args.smooth, title=args.title)
    print(f"wrote {save_figure(fig, args.out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsfm", description=__doc__)
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("prepare", help="tokenize a corpus into packed train/val token files")
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="text/JSONL(.gz/.zst)/Parquet files, directories, globs, `stdlib` (the embedded "
        "corpus) or hf:NAME[:SPLIT] (a local or cached Hugging Face dataset)",
    )
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="reuse a tokenizer.json (path), or `byte`; default: train a BPE",
    )
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size")
    p.add_argument("--text-key", default="text", help="JSONL/Parquet field holding the text")
    p.add_argument("--val-fraction", type=float, default=0.01, help="documents held out")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--max-bytes", type=int, default=None, help="cap on corpus bytes read")
    p.add_argument(
        "--workers", type=int, default=1, help="tokenizer processes (output is identical)"
    )
    p.add_argument(
        "--shard-size",
        type=parse_size,
        default=None,
        help="cut each split into .bin shards below this size (e.g. 1GB); default: one file",
    )
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument(
        "--chat",
        action="store_true",
        help="instruction data: JSONL of {messages: [...]} or {prompt, response}; "
        "adds chat tokens to --tokenizer and a loss mask on assistant turns",
    )
    p.set_defaults(func=prepare_main)

    p = sub.add_parser("data", help="inspect (stats) or check (verify) a prepared dataset")
    data_sub = p.add_subparsers(dest="data_verb", required=True)
    q = data_sub.add_parser("stats", help="counts, lengths, top tokens, a random document")
    q.add_argument("dir", help="prepared dataset directory")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.add_argument("--seed", type=int, default=0, help="picks the random document")
    q.set_defaults(func=data_stats_main)
    q = data_sub.add_parser("verify", help="sizes, checksums, token ids, offsets; exit 1 if bad")
    q.add_argument("dir", help="prepared dataset directory")
    q.set_defaults(func=data_verify_main)

    p = sub.add_parser("train", help="pretrain in this process (same code as the launcher)")
    add_train_args(p)
    p.set_defaults(func=train_main)

    p = sub.add_parser("finetune", help="fine-tune from train.init_from (LoRA or full)")
    add_train_args(p)
    p.set_defaults(func=finetune_main, config="configs/sft_lora.yaml")

    p = sub.add_parser("merge", help="fold LoRA adapters into a plain checkpoint")
    p.add_argument("checkpoint", help="run dir, checkpoints dir or tag dir")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.set_defaults(func=merge_main)

    p = sub.add_parser("export", help="write a Hugging Face Llama directory")
    p.add_argument("checkpoint", help="run dir, checkpoints dir, tag dir or plain checkpoint")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.set_defaults(func=export_main)

    p = sub.add_parser("import", help="turn a local Hugging Face Llama directory into a checkpoint")
    p.add_argument("hf_dir", help="directory with config.json, safetensors and tokenizer.json")
    p.add_argument("--out", required=True, help="output plain checkpoint directory")
    p.set_defaults(func=import_main)

    p = sub.add_parser("eval", help="loss, perplexity and bits per byte on a prepared split")
    p.add_argument("checkpoint", help="run dir, checkpoints dir, tag dir or plain checkpoint")
    p.add_argument("--data", required=True, help="prepared dataset directory")
    p.add_argument("--split", default="val")
    p.add_argument("--seq-len", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-samples", type=int, default=None, help="default: the whole split")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=eval_main)

    p = sub.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("checkpoint", help="run dir, its checkpoints/ dir, or a tag dir")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--no-cache", action="store_true", help="recompute the context every token")
    p.add_argument(
        "--chat",
        action="store_true",
        help="send the prompt as a user turn of a chat model; print the reply",
    )
    p.set_defaults(func=generate_main)

    p = sub.add_parser(
        "plan", help="parameters, FLOPs, time and memory per ZeRO setup, before training"
    )
    p.add_argument("--config", help="training config YAML (e.g. configs/d12.yaml)")
    p.add_argument(
        "--ds",
        default="ds_configs/zero0.json",
        help="DeepSpeed config whose bf16/fp16 section gives the precision (train.precision "
        "wins); every ds_configs/ recipe is planned",
    )
    p.add_argument("--gpus", type=int, default=1, help="GPUs in the job (default 1)")
    p.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        help="for CPU RAM per node (default min(gpus, 8))",
    )
    p.add_argument(
        "--gpu", default=None, help="card name: H100, A100, RTX 4090, ... (default H100)"
    )
    p.add_argument(
        "--gpu-mem", type=float, default=None, help="GPU memory in GiB (another card, or override)"
    )
    p.add_argument(
        "--tokens",
        type=float,
        default=None,
        help="training tokens (default: max_steps x global batch x seq_len)",
    )
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for the time")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=32000,
        help="vocabulary when neither model.vocab_size nor prepared data gives one",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object with every number")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p.set_defaults(func=plan_main)

    p = sub.add_parser("config", help="print every setting's reference, or one resolved value")
    p.add_argument("--config", help="training config YAML")
    p.add_argument("--get", metavar="SECTION.FIELD", help="print this resolved value")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p.set_defaults(func=config_main)

    p = sub.add_parser("runs", help="table of runs: status, model, data, steps, losses, speed")
    p.add_argument("dirs", nargs="*", default=["runs"], metavar="DIR", help="default: runs/")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per run")
    p.add_argument("--sort", default="name", metavar="KEY", help="e.g. best_val_loss, tokens")
    p.set_defaults(func=runs_main)

    p = sub.add_parser("plot", help="one dashboard image of runs: loss, ppl, LR, grad norm, speed")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories to overlay")
    p.add_argument("--out", required=True, help="image file: .png, .pdf or .svg")
    p.add_argument("--x", choices=["step", "tokens"], default="step", help="shared x axis")
    p.add_argument(
        "--smooth", type=int, default=None, help="moving-average window in steps (default: auto)"
    )
    p.add_argument("--title", default=None, help="figure title (default: the run names)")
    p.set_defaults(func=plot_main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"dsfm {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
