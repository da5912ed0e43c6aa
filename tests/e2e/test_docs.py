"""Every shell command in docs/*.md and README.md runs: the guides cannot rot.

Each ```bash block of a guide runs in order, in one scratch project directory per guide
(configs/, ds_configs/, launchers/ and slurm/ linked in), under `bash -euo pipefail`, with
the installed `dsfm` and `deepspeed` on PATH. Blocks tagged ```bash ci=tiny are sized for
GPUs or a cluster; they run here with the substitutions in `tiny()`: two CPU ranks instead
of `--num_gpus N`, a tiny model (unless one comes from `train.init_from`) and a few steps,
and `sbatch` replaced by the script's own `--dry-run`. A block tagged
```bash ci=skip: REASON cannot run here (network, the whole suite) and says why. The guides
make their own inputs; README.md names the user's files (`input.txt`, `corpus/*.jsonl`, a
hub model, ...), so `readme_inputs()` writes tiny real ones at those paths first.
docs/README.md states the same rules for readers.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, job_env

DOCS = sorted((ROOT / "docs").glob("*.md"))
NOT_GUIDES = ("README.md", "architecture.md")  # the index and the design: no commands to run
README = ROOT / "README.md"
GUIDES = [d for d in DOCS if d.name not in NOT_GUIDES] + [README]
FENCE = re.compile(r"^```bash(?P<tags>[^\n]*)\n(?P<body>.*?)^```", re.M | re.S)
TAGS = re.compile(r"^( ci=tiny| ci=skip: \S.*)?$")  # what a fence may say after ```bash

# What a tiny block's training commands get appended: the smallest model that still has every
# part, fp32 (the numbers the CPU tests compare exactly), a handful of steps.
TINY_OVERRIDES = [
    "model.d_model=64",
    "model.n_heads=4",
    "model.n_layers=2",
    "model.max_seq_len=64",
    "train.seq_len=32",
    "train.micro_batch_size=2",
    "train.grad_accum=1",
    "train.max_steps=4",
    "train.precision=fp32",
    "schedule.warmup_steps=1",
    "eval.every=2",
    "eval.batches=1",
    "eval.max_new_tokens=4",
    "checkpoint.every=2",
]


def blocks(doc: Path) -> list[tuple[str, str]]:
    """(tags, shell text) of every ```bash block, in order."""
    return [(m["tags"], m["body"]) for m in FENCE.finditer(doc.read_text())]


def commands(text: str) -> list[str]:
    """Shell lines with backslash continuations joined; blank and comment lines kept as is."""
    return text.replace("\\\n", " ").splitlines()


def tiny(line: str) -> str:
    """A cluster-sized command as CI runs it (see the module docstring)."""
    words = shlex.split(line, comments=True)
    if not words:
        return line
    if words[0] == "sbatch":
        script = next(i for i, w in enumerate(words) if w.endswith(".sbatch"))
        return shlex.join(["bash", words[script], "--dry-run", *words[script + 1 :]])
    trains = any(w.startswith("launchers/") for w in words) or words[:2] in (
        ["dsfm", "train"],
        ["dsfm", "finetune"],
    )
    if not trains:
        return line
    if words[0] == "deepspeed":
        launcher = next(i for i, w in enumerate(words) if w.startswith("launchers/"))
        words = ["deepspeed", "--num_gpus", "2", *words[launcher:]]
    overrides = TINY_OVERRIDES
    if any(w.startswith("train.init_from=") for w in words):  # the model is the one it starts from
        overrides = [o for o in overrides if not o.startswith("model.")]
    return shlex.join([*words, *overrides])


def scratch_project(tmp: Path) -> dict[str, str]:
    for name in ("configs", "ds_configs", "launchers", "slurm"):
        (tmp / name).symlink_to(ROOT / name)
    bin_dir = str(Path(sys.executable).parent)
    return dict(
        job_env(),
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        PYTHON=sys.executable,
        PYTHONPATH=str(ROOT),
        WANDB_MODE="offline",
        WANDB_SILENT="true",
    )


def readme_inputs(tmp: Path) -> None:
    """Tiny real files at the paths README.md's commands name as the user's own."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    import transformers
    import zstandard
    from datasets import Dataset, DatasetDict

    from dsfm.data.corpus import stdlib_documents
    from dsfm.data.tokenizer import Tokenizer, byte_tokenizer
    from tests import family_tokenizers

    text = "".join(stdlib_documents(max_bytes=300_000))
    docs = [text[i : i + 3000] for i in range(0, 240_000, 3000)]  # 80 documents of 3 KB
    (tmp / "input.txt").write_text("\n".join(docs[:20]))  # one document, as tinyshakespeare
    for name, part in (("corpus", docs[:40]), ("crawl", docs[40:60])):
        (tmp / name).mkdir()
        lines = "".join(json.dumps({"text": d}) + "\n" for d in part)
        (tmp / name / "a.jsonl").write_text(lines)
    zst = zstandard.ZstdCompressor().compress((tmp / "crawl" / "a.jsonl").read_bytes())
    (tmp / "crawl" / "a.jsonl.zst").write_bytes(zst)
    (tmp / "crawl" / "a.jsonl").unlink()
    pq.write_table(pa.table({"text": docs[60:70]}), tmp / "books.parquet")
    DatasetDict({"train": Dataset.from_dict({"text": docs[70:80]})}).save_to_disk(tmp / "wiki")
    (tmp / "TinyStoriesV2-GPT4-train.txt").write_text(
        "<|endoftext|>".join(f"Once upon a time, story {i} began.\n" for i in range(300))
    )
    byte_tokenizer().save(tmp / "gpt2")  # ids below 257: a uint16 train.bin of them
    np.frombuffer(("\n".join(docs[:5])).encode(), np.uint8).astype(np.uint16).tofile(
        tmp / "train.bin"
    )
    (tmp / "my_zero3.json").write_text((ROOT / "ds_configs" / "zero3.json").read_text())
    # a tiny "hub model" with an instruct chat template, at the hub id's path
    hub = family_tokenizers.llama3(tmp / "HuggingFaceTB" / "SmolLM2-135M-Instruct")
    cfg = transformers.LlamaConfig(
        vocab_size=Tokenizer.load(hub).vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,  # room for README's chat system message and a reply
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(hub)
    (tmp / "chats").mkdir()
    with open(tmp / "chats" / "a.jsonl", "w") as f:
        for i in range(200):
            messages = [
                {"role": "user", "content": f"What is {i} + 1?"},
                {"role": "assistant", "content": f"{i + 1}."},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")


# What README.md names that cannot exist in a scratch directory, as the test's stand-ins.
README_PATHS = {
    "hf:/data/wiki:train": "hf:wiki:train",
    ". .venv/bin/activate": "true  # PATH already holds dsfm",
}


def test_docs_exist_and_have_commands():
    names = {d.name for d in DOCS}
    assert {"training.md", "deepspeed.md", "slurm.md"} <= names, names
    for doc in GUIDES:
        assert blocks(doc), f"{doc.name} has no ```bash block to check"
        for tags, _ in blocks(doc):
            assert TAGS.match(tags), f"{doc.name}: ```bash{tags}: use ci=tiny or ci=skip: REASON"


def test_skipped_readme_targets_exist():
    """The one block README.md cannot run (make quickstart / make test): its targets exist."""
    proc = subprocess.run(
        ["make", "-n", "quickstart", "test"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "dsfm train --config configs/smoke.yaml" in proc.stdout


def test_tiny_rewrites_cluster_commands():
    assert tiny("sbatch --nodes=4 slurm/pretrain.sbatch configs/d20.yaml ds.json a.b=1") == (
        "bash slurm/pretrain.sbatch --dry-run configs/d20.yaml ds.json a.b=1"
    )
    line = tiny("deepspeed --num_gpus 8 launchers/pretrain.py --ds ds_configs/zero2.json")
    assert line.startswith("deepspeed --num_gpus 2 launchers/pretrain.py --ds ds_configs/zero2")
    assert line.endswith("checkpoint.every=2")
    assert tiny("dsfm runs runs/") == "dsfm runs runs/"
    line = tiny("dsfm finetune --config configs/sft_lora.yaml train.init_from=ckpt/smol")
    assert "train.max_steps=4" in line and "model." not in line


@pytest.mark.parametrize("doc", GUIDES, ids=lambda d: d.stem)
def test_every_command_in_the_guide_runs(doc, tmp_path):
    env = scratch_project(tmp_path)
    if doc == README:
        readme_inputs(tmp_path)
    for i, (tags, text) in enumerate(blocks(doc)):
        if "ci=skip" in tags:
            continue
        if doc == README:
            for path, stand_in in README_PATHS.items():
                text = text.replace(path, stand_in)
        script = "\n".join(tiny(c) if "ci=tiny" in tags else c for c in commands(text))
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,  # `dsfm chat` reads a conversation: none, it ends
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, (
            f"{doc.name} block {i + 1} exited {proc.returncode}:\n{script}\n--- stdout\n"
            f"{proc.stdout[-2000:]}\n--- stderr\n{proc.stderr[-4000:]}"
        )
