"""`dsfm <verb>`: prepare, data, ckpt, train, finetune, generate, chat, eval, merge, export, import,
config, runs, plot, plan, doctor.

The command line and nothing else: each verb is a function in the module that owns its
concern (VERBS), called with the parsed arguments by name. Modules are imported when their
verb runs, so `dsfm plan`, `dsfm runs` and `--help` start without torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from typing import NoReturn

# verb -> (module, function); the function's parameters are the verb's argument names.
VERBS = {
    "prepare": ("dsfm.data.prepare", "prepare_command"),
    "data stats": ("dsfm.data.stats", "stats_command"),
    "data verify": ("dsfm.data.stats", "verify_command"),
    "ckpt verify": ("dsfm.train.checkpoint", "verify_command"),
    "train": ("dsfm.train.trainer", "train_command"),
    "finetune": ("dsfm.train.trainer", "finetune_command"),
    "merge": ("dsfm.interop.merge", "merge_command"),
    "export": ("dsfm.interop.hf", "export_command"),
    "import": ("dsfm.interop.hf", "import_command"),
    "eval": ("dsfm.eval.loss", "eval_command"),
    "generate": ("dsfm.eval.generate", "generate_command"),
    "chat": ("dsfm.eval.chat", "chat_command"),
    "plan": ("dsfm.plan", "plan_command"),
    "doctor": ("dsfm.doctor", "doctor_command"),
    "config": ("dsfm.config.reference", "config_command"),
    "runs": ("dsfm.observe.runs", "runs_command"),
    "plot": ("dsfm.observe.plot", "plot_command"),
}


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    verb = args.pop("verb")
    module, function = VERBS[args.pop("command")]
    for launcher_only in ("data_verb", "ckpt_verb", "local_rank"):
        args.pop(launcher_only, None)
    try:
        return getattr(importlib.import_module(module), function)(**args)
    except (FileNotFoundError, FileExistsError, ValueError) as e:  # ConfigError is a ValueError
        print(f"dsfm {verb}: error: {e}", file=sys.stderr)
        return 2


def run(argv: list[str] | None = None) -> NoReturn:
    """The process entry point (the `dsfm` command, `python -m dsfm.launch.*`): `main`, then
    exit. A process that joined a process group ends without Python's finalization: a gloo
    worker thread still freeing a finished collective's tensors then needs the GIL, and
    finalization ends such threads with an unwind that C++ turns into an abort
    ("terminate called without an active exception", status 134 after a run that succeeded).
    Everything dsfm writes is closed by then; the streams are flushed here."""
    try:
        code = main(argv)
    except Exception:
        if not _joined_process_group():
            raise
        traceback.print_exc()  # as Python would, but exit 1, never the abort's 134
        code = 1
    if _joined_process_group():
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


def _joined_process_group() -> bool:
    dist = sys.modules.get("torch.distributed")  # never imported by verbs without torch
    return dist is not None and dist.is_available() and dist.is_initialized()


class _Help(argparse.HelpFormatter):
    """Every option's default in its help, unless there is none or the help says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            action.default in (None, argparse.SUPPRESS)
            or action.default is False
            or ("default" in text)
        ):
            return text
        return f"{text} (default: %(default)s)".lstrip()


def build_parser() -> argparse.ArgumentParser:
    from dsfm import __version__

    parser = argparse.ArgumentParser(
        prog="dsfm",
        description="Train decoder-only transformer language models from scratch on "
        "DeepSpeed, fine-tune them, and evaluate, export and compare them.",
        epilog="`dsfm VERB --help` describes a verb; start with `dsfm train --config smoke`.",
    )
    parser.add_argument("--version", action="version", version=f"dsfm {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = _verb(sub, "prepare", "tokenize a corpus into packed train/val token files")
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
        help="reuse a tokenizer: its file, a directory holding one (with its config "
        "files: BOS/EOS/template), a cached hub id org/name, or `byte`; "
        "default: train a BPE",
    )
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size")
    p.add_argument("--text-key", default="text", help="JSONL/Parquet field holding the text")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.01,
        help="share of tokens held out for validation: whole documents, or the end of the "
        "corpus when documents are too few (one text file)",
    )
    p.add_argument("--seed", type=int, default=1337, help="shuffles the train/val assignment")
    p.add_argument("--max-bytes", type=int, default=None, help="cap on corpus bytes read")
    p.add_argument(
        "--workers", type=int, default=1, help="tokenizer processes (output is identical)"
    )
    p.add_argument(
        "--shard-size",
        default=None,
        help="cut each split into .bin shards below this size (e.g. 1GB); default: one file",
    )
    p.add_argument(
        "--doc-separator",
        default=None,
        help="split text files into documents at this string, e.g. '<|endoftext|>' "
        "(TinyStories); default: one document per file",
    )
    p.add_argument(
        "--dtype",
        choices=("uint16", "uint32"),
        default=None,
        help="id type of raw .bin token arrays (nanoGPT: uint16); default: inferred when "
        "unambiguous",
    )
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument(
        "--chat",
        action="store_true",
        help="instruction data: JSONL of {messages: [...]} or {prompt, response}; "
        "rendered with --tokenizer's own chat_template if it has one, else dsfm's (chat "
        "tokens added); a loss mask on assistant turns",
    )

    p = sub.add_parser(
        "data",
        help="inspect (stats) or check (verify) a prepared dataset",
        description="inspect (stats) or check (verify) a prepared dataset",
    )
    data_sub = p.add_subparsers(dest="data_verb", required=True, metavar="stats|verify")
    q = _verb(data_sub, "stats", "counts, lengths, top tokens, a random document", "data stats")
    q.add_argument("data_dir", metavar="dir", help="prepared dataset directory")
    q.add_argument("--json", dest="as_json", action="store_true", help="print one JSON object")
    q.add_argument("--seed", type=int, default=0, help="picks the random document")
    q = _verb(
        data_sub, "verify", "sizes, checksums, token ids, offsets; exit 1 if bad", "data verify"
    )
    q.add_argument("data_dir", metavar="dir", help="prepared dataset directory")

    p = sub.add_parser(
        "ckpt",
        help="check a run's checkpoint tags (verify)",
        description="check a run's checkpoint tags (verify)",
    )
    ckpt_sub = p.add_subparsers(dest="ckpt_verb", required=True, metavar="verify")
    q = _verb(
        ckpt_sub,
        "verify",
        "every tag's files against its manifest (sizes, sha256); exit 1 if any is damaged",
        "ckpt verify",
    )
    q.add_argument("run", help="run directory (or its checkpoints/ directory)")

    p = _verb(sub, "train", "pretrain in this process (same code as the launcher)", trust=True)
    add_train_args(p)
    p.add_argument(
        "--data",
        default=None,
        help="a prepared dataset directory (= data.path), or raw text to prepare into RUN/data/ "
        "first and reuse after: a file, directory, glob or JSONL (default, with no data.path: "
        "the embedded corpus, prepared once into $DSFM_CACHE or ~/.cache/dsfm)",
    )
    p = _verb(sub, "finetune", "fine-tune from train.init_from (LoRA or full)", trust=True)
    add_train_args(p, config="sft_lora")

    p = _verb(sub, "merge", "fold LoRA adapters into a plain checkpoint", trust=True)
    p.add_argument(
        "checkpoint_path", metavar="checkpoint", help="run dir, checkpoints dir or tag dir"
    )
    p.add_argument("--out", required=True, help="output directory (must not exist)")

    p = _verb(sub, "export", "write a Hugging Face model directory (or a PEFT adapter)", trust=True)
    p.add_argument(
        "checkpoint_path",
        metavar="checkpoint",
        help="run dir, checkpoints dir, tag dir or plain checkpoint",
    )
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="weights' dtype")
    p.add_argument(
        "--adapter",
        action="store_true",
        help="write a LoRA run's adapters in PEFT's format (for its exported base model)",
    )

    p = _verb(sub, "import", "turn a Hugging Face Llama, Mistral or Qwen2 model into a checkpoint")
    p.add_argument(
        "name",
        metavar="NAME_OR_DIR",
        help="a hub id (org/name, read from the Hugging Face cache first) or a Hugging Face "
        "model directory (safetensors weights and a fast tokenizer)",
    )
    p.add_argument("--out", required=True, help="output plain checkpoint directory")

    p = _verb(
        sub,
        "eval",
        "loss/perplexity/bits per byte on a split (--data), or benchmarks (--tasks)",
        trust=True,
    )
    p.add_argument(
        "checkpoint_path",
        metavar="checkpoint",
        help="run dir, checkpoints dir, tag dir or plain checkpoint",
    )
    p.add_argument("--data", default=None, help="prepared dataset directory (loss, ppl, bpb)")
    p.add_argument(
        "--tasks",
        default=None,
        help="lm-evaluation-harness tasks, comma-separated (e.g. hellaswag,arc_easy); "
        "needs `pip install 'dsfm[eval]'`",
    )
    p.add_argument("--split", default="val", help="with --data: train or val")
    p.add_argument("--seq-len", type=int, default=None, help="with --data; default: the model's")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument(
        "--max-samples", type=int, default=None, help="with --data; default: the whole split"
    )
    p.add_argument(
        "--limit",
        type=float,
        default=None,
        help="with --tasks: documents per task (<1: a fraction)",
    )
    p.add_argument(
        "--num-fewshot", type=int, default=None, help="with --tasks; default: each task's own"
    )
    p.add_argument(
        "--include-path", default=None, help="with --tasks: a directory of your own task YAMLs"
    )
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="compute dtype")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda:0 (default: cuda if present)")
    p.add_argument("--json", dest="as_json", action="store_true", help="print one JSON object")

    p = _verb(sub, "generate", "sample text from a checkpoint", trust=True)
    p.add_argument(
        "checkpoint_path", metavar="checkpoint", help="run dir, its checkpoints/ dir, or a tag dir"
    )
    p.add_argument("--prompt", default="", help="text to continue (default: none)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to sample")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest only")
    p.add_argument(
        "--top-p", type=float, default=None, help="sample from the smallest set with mass p"
    )
    p.add_argument("--seed", type=int, default=0, help="the sampling seed")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="compute dtype")
    p.add_argument("--no-cache", action="store_true", help="recompute the context every token")
    p.add_argument(
        "--chat",
        action="store_true",
        help="send the prompt as a user turn of a chat model; print the reply",
    )
    p.add_argument("--system", default=None, help="with --chat: a system message first")

    p = _verb(
        sub, "chat", "talk to a chat model in the terminal (/reset, /exit, Ctrl-D)", trust=True
    )
    p.add_argument(
        "checkpoint_path", metavar="checkpoint", help="run dir, its checkpoints/ dir, or a tag dir"
    )
    p.add_argument("--system", default=None, help="a system message, kept through /reset")
    p.add_argument("--max-new-tokens", type=int, default=200, help="per reply")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest only")
    p.add_argument(
        "--top-p", type=float, default=None, help="sample from the smallest set with mass p"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="each reply is seeded with it, as `dsfm generate`"
    )
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="compute dtype")

    p = _verb(sub, "plan", "parameters, FLOPs, time and memory per ZeRO setup, before training")
    p.add_argument("--config", help="training config: a YAML file or a bundled name (e.g. d12)")
    p.add_argument(
        "--ds",
        default="zero0",
        help="DeepSpeed recipe whose bf16/fp16 section gives the precision (train.precision "
        "wins); every bundled recipe is planned",
    )
    p.add_argument("--gpus", type=int, default=1, help="GPUs in the job")
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
    p.add_argument(
        "--json",
        dest="as_json",
        action="store_true",
        help="print one JSON object with every number",
    )
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")

    p = _verb(sub, "doctor", "can this machine run these configs? versions, GPUs, DeepSpeed ops")
    p.add_argument(
        "--ds",
        action="append",
        metavar="RECIPE",
        help="DeepSpeed recipe to check, a JSON file or a bundled name (repeat for more; "
        "default: every bundled recipe)",
    )
    p.add_argument(
        "--config", help="training config, YAML or bundled (its train.precision wins, as in train)"
    )
    p.add_argument(
        "--json", dest="as_json", action="store_true", help="print one JSON object with everything"
    )
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")

    p = _verb(
        sub,
        "config",
        "a config resolved (defaults < --config < overrides) as YAML; the reference of every "
        "setting when given nothing",
    )
    p.add_argument("--config", help="training config: a YAML file or a bundled name")
    p.add_argument("--get", metavar="SECTION.FIELD", help="print this resolved value only")
    p.add_argument(
        "--diff", action="store_true", help="print only the settings that differ from defaults"
    )
    p.add_argument(
        "--reference",
        dest="show_reference",
        action="store_true",
        help="print every setting's default and meaning",
    )
    p.add_argument(
        "--list",
        dest="list_bundled",
        action="store_true",
        help="list the bundled training configs and DeepSpeed recipes",
    )
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")

    p = _verb(sub, "runs", "table of runs: status, model, data, steps, losses, speed")
    p.add_argument("dirs", nargs="*", default=["runs"], metavar="DIR", help="default: runs/")
    p.add_argument(
        "--json", dest="as_json", action="store_true", help="print a JSON list, one object per run"
    )
    p.add_argument("--sort", default="name", metavar="KEY", help="e.g. best_val_loss, tokens")

    p = _verb(sub, "plot", "one dashboard image of runs: loss, ppl, LR, grad norm, speed")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories to overlay")
    p.add_argument("--out", required=True, help="image file: .png, .pdf or .svg")
    p.add_argument("--x", choices=["step", "tokens"], default="step", help="shared x axis")
    p.add_argument(
        "--smooth", type=int, default=None, help="moving-average window in steps (default: auto)"
    )
    p.add_argument("--title", default=None, help="figure title (default: the run names)")
    return parser


def add_train_args(p: argparse.ArgumentParser, config: str | None = None) -> None:
    p.add_argument(
        "--config",
        default=config,
        help="training config: a YAML file or a bundled name (`dsfm config --list`)",
    )
    p.add_argument(
        "--ds",
        default="zero0",
        help="DeepSpeed recipe, how to run: a JSON file or a bundled name (zero0..zero3, "
        "zero2_offload, zero3_offload)",
    )
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="config overrides, e.g. train.max_steps=100 data.path=data/stdlib",
    )


def _verb(
    sub, name: str, help: str, command: str | None = None, trust: bool = False
) -> argparse.ArgumentParser:
    """A verb's parser; `trust`: it loads checkpoints, so it takes --trust-checkpoint."""
    p = sub.add_parser(name, help=help, description=help, formatter_class=_Help)
    p.set_defaults(command=command or name)
    if trust:
        p.add_argument(
            "--trust-checkpoint",
            action="store_true",
            help="load checkpoint files that hold pickled objects besides tensors (refused "
            "otherwise: unpickling them can run code); only for checkpoints you trust",
        )
    return p


if __name__ == "__main__":
    run()
