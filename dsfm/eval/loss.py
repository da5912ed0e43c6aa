"""Validation loss, perplexity and bits per byte over a fixed set of samples, on every rank.

Design choices:
- The set is the first `n` samples of the split (the same every time, so evals are
  comparable across steps and runs), split contiguously across ranks. In training
  (`eval_indices`) every rank runs the same number of forward passes, since ZeRO-3
  forwards are collective; a standalone eval (`evaluate_checkpoint`) runs a plain model, so
  its ranks may differ by one sample and every sample of the split is used.
- One loop (`loss_totals`) sums nats, target tokens and target bytes in float64 on the
  device and all-reduces them once; `mean_loss` and `evaluate_checkpoint` are views of it.
  Sums, not means of means, so the result does not depend on how samples are sharded.
  Labels the dataset masks out (-100: prompts in instruction data) count nowhere.
- A model trained with document masking (`model.doc_mask`) is evaluated with it: the
  same per-document positions (`dataset.doc_positions`) reach the forward, so val loss
  measures what training optimised.
- Bits per byte = total nats / ln 2 / total UTF-8 bytes of the targets. Unlike loss and
  perplexity it does not depend on the tokenizer, so models with different vocabularies
  compare on the same text. Special tokens (EOT, chat markers) stand for no text and count
  0 bytes, while their loss still counts: the model has to predict document ends too.
- A token's byte count comes from its byte-level symbols (one symbol per byte), not from
  decoding it alone: a token holding half of a UTF-8 character decodes to U+FFFD (3 bytes)
  but stands for 1 or 2 bytes. This is exact for every dsfm tokenizer (byte-level BPE and
  the byte tokenizer); other kinds (sentencepiece-style, imported) are counted best-effort.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsfm.data.blend import BlendedDataset
from dsfm.data.dataset import TokenDataset, doc_positions
from dsfm.data.tokenizer import TOKENIZER_FILE, Tokenizer, tokenizer_file
from dsfm.distributed.collectives import all_reduce_sum, rank_and_world
from dsfm.interop.weights import load_model
from dsfm.model.gpt import IGNORE_INDEX
from dsfm.progress import Tracker
from dsfm.train import checkpoint

LN2 = math.log(2.0)
BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")  # sentencepiece's raw-byte tokens
METASPACE = "\u2581"  # sentencepiece's visible space


def eval_indices(dataset: TokenDataset, n_samples: int, rank: int, world_size: int) -> list[int]:
    n = min(len(dataset), n_samples) // world_size * world_size
    per_rank = n // world_size
    return list(range(rank * per_rank, (rank + 1) * per_rank))


def shard_indices(n_samples: int, rank: int, world_size: int) -> list[int]:
    """Rank's contiguous slice of `range(n_samples)`; slices differ in length by at most one."""
    return list(range(n_samples * rank // world_size, n_samples * (rank + 1) // world_size))


@torch.no_grad()
def loss_totals(
    forward: Callable[..., torch.Tensor],
    dataset: TokenDataset,
    indices: list[int],
    micro_batch_size: int,
    device: torch.device,
    byte_lengths: np.ndarray | None = None,
    doc_mask: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[float, int, int]:
    """(nats, target tokens, target bytes) summed over `indices` and all-reduced across ranks.

    `forward(inputs, labels=labels, positions=positions)` returns the mean loss over labels
    != -100; positions are per document with `doc_mask`, else None. Bytes are 0 unless
    `byte_lengths` (bytes per token id, see `token_byte_lengths`) is given. `on_batch(n)` is
    called after each batch of n samples (progress).
    """
    total = torch.zeros(3, dtype=torch.float64, device=device)  # nats, tokens, bytes
    lengths = torch.from_numpy(byte_lengths) if byte_lengths is not None else None
    for start in range(0, len(indices), micro_batch_size):
        inputs, labels = dataset.inputs_and_labels(indices[start : start + micro_batch_size])
        counted = labels != IGNORE_INDEX  # (B, T)
        n_tokens = int(counted.sum())
        n_bytes = int(lengths[labels.clamp(min=0)][counted].sum()) if lengths is not None else 0
        positions = doc_positions(inputs, dataset.eot_id).to(device) if doc_mask else None
        loss = forward(inputs.to(device), labels=labels.to(device), positions=positions)
        # Accumulated on the device: no host sync per batch.
        total[0] += loss.detach().double() * n_tokens
        total[1] += n_tokens
        total[2] += n_bytes
        if on_batch is not None:
            on_batch(len(inputs))
    nats, tokens, n_bytes = all_reduce_sum(total).tolist()
    return nats, int(tokens), int(n_bytes)


def mean_loss(
    forward: Callable[..., torch.Tensor],
    dataset: TokenDataset,
    indices: list[int],
    micro_batch_size: int,
    device: torch.device,
    doc_mask: bool = False,
) -> float:
    """Token-mean cross-entropy over `indices` on this rank, all-reduced across ranks."""
    nats, tokens, _ = loss_totals(
        forward, dataset, indices, micro_batch_size, device, doc_mask=doc_mask
    )
    return nats / tokens if tokens > 0 else float("nan")


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def val_metrics(loss: float) -> dict[str, Any]:
    return {"val_loss": loss, "val_ppl": perplexity(loss)}


def blend_val_metrics(
    forward: Callable[..., torch.Tensor],
    blend: BlendedDataset,
    n_samples: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    device: torch.device,
    doc_mask: bool = False,
) -> dict[str, Any]:
    """`val_metrics` of a blend's first `n_samples` positions, plus `val_loss/<name>` per source.

    Each source's share is evaluated on its own dataset and split across ranks on its own
    (cut to a multiple of the world size), so every rank runs the same forwards (ZeRO-3) and
    the blended loss is the token-weighted sum of the sources' nats, not a mean of means.
    """
    nats = tokens = 0.0
    per_source = {}
    positions = range(min(len(blend), n_samples))
    for name, dataset, samples in zip(blend.names, blend.datasets, blend.by_source(positions)):
        n = len(samples) // world_size * world_size
        mine = samples[rank * n // world_size : (rank + 1) * n // world_size].tolist()
        s_nats, s_tokens, _ = loss_totals(
            forward, dataset, mine, micro_batch_size, device, doc_mask=doc_mask
        )
        per_source[f"val_loss/{name}"] = s_nats / s_tokens if s_tokens else float("nan")
        nats, tokens = nats + s_nats, tokens + s_tokens
    return {**val_metrics(nats / tokens if tokens else float("nan")), **per_source}


# ---------------------------------------------------------------------------------------
# Bits per byte


def _decoder_types(hf_tokenizer: Any) -> set[str]:
    """The decoder's type and, for a Sequence, its parts' types (e.g. {"ByteLevel"})."""
    decoder = json.loads(hf_tokenizer.to_str()).get("decoder") or {}
    return {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", [])}


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes of text that each token id stands for, shape (vocab_size,), int64.

    Special tokens count 0; other added tokens count their content. For byte-level BPE each
    symbol of a token is one byte, so a token that holds part of a multi-byte character
    counts exactly the bytes it holds (decoding it alone would give U+FFFD, 3 bytes).
    """
    from tokenizers import pre_tokenizers

    hf = tokenizer.hf_tokenizer
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    byte_level = "ByteLevel" in _decoder_types(hf)
    added = hf.get_added_tokens_decoder()  # {id: AddedToken}
    lengths = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for i in range(tokenizer.vocab_size):
        if i in added:
            lengths[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
            continue
        piece = hf.id_to_token(i)
        if piece is None:
            continue  # a hole in the vocabulary: no text
        if byte_level and all(c in alphabet for c in piece):
            lengths[i] = len(piece)
        elif BYTE_FALLBACK.match(piece):
            lengths[i] = 1
        elif METASPACE in piece:
            # Decoding alone would strip the leading space that the symbol stands for.
            lengths[i] = len(piece.replace(METASPACE, " ").encode("utf-8"))
        else:
            lengths[i] = len(hf.decode([i], skip_special_tokens=False).encode("utf-8"))
    return lengths


def _check_data_fits(tokenizer: Tokenizer, vocab_size: int, dataset: TokenDataset) -> None:
    """Refuse data whose ids the model cannot embed or that another tokenizer produced."""
    where = dataset.data_dir
    limit = min(tokenizer.vocab_size, vocab_size)
    if dataset.vocab_size > limit:
        raise ValueError(
            f"{where} was tokenized with a {dataset.vocab_size}-token vocabulary, larger than "
            f"the model's ({limit}); prepare the data with the checkpoint's tokenizer "
            f"(`dsfm prepare --tokenizer CHECKPOINT/{TOKENIZER_FILE}`)"
        )
    data_tok_file = tokenizer_file(where)
    if data_tok_file.is_file():
        data_vocab = Tokenizer.load(data_tok_file).hf_tokenizer.get_vocab(with_added_tokens=True)
        model_vocab = tokenizer.hf_tokenizer.get_vocab(with_added_tokens=True)
        differ = [t for t, i in data_vocab.items() if model_vocab.get(t) != i]
        if differ:
            raise ValueError(
                f"{where} was tokenized with a different tokenizer than the model's "
                f"({len(differ)} tokens map to other ids, e.g. {differ[0]!r}); prepare the "
                f"data with the checkpoint's {TOKENIZER_FILE}"
            )


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())  # the launcher set it per rank
    return torch.device("cpu")


def evaluate_checkpoint(
    checkpoint_path: str | Path,
    data_dir: str | Path,
    *,
    split: str = "val",
    seq_len: int | None = None,
    batch_size: int = 8,
    max_samples: int | None = None,
    dtype: str = "fp32",
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Loss, perplexity and bits per byte of a checkpoint on a prepared split.

    Every sample of the split (or the first `max_samples`) in order, so two calls agree.
    With torch.distributed initialised, each rank takes a contiguous slice and the sums
    are all-reduced; every rank returns the same result. `seq_len` defaults to the
    checkpoint's train.seq_len, capped at its model.max_seq_len.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(
            f"max_samples must be >= 1 (or None for the whole split), got {max_samples}"
        )
    ckpt_dir, tag = checkpoint.resolve(checkpoint_path)
    config = checkpoint.client_state(ckpt_dir, tag)["config"]
    max_seq_len = config["model"]["max_seq_len"]
    if seq_len is None:
        seq_len = min(config["train"]["seq_len"], max_seq_len)
    elif not 1 <= seq_len <= max_seq_len:
        raise ValueError(
            f"seq_len must be in [1, {max_seq_len}] (model.max_seq_len), got {seq_len}"
        )

    dataset = TokenDataset(data_dir, split, seq_len)
    # Checked before the weights are read: consolidating a large ZeRO checkpoint takes time.
    _check_data_fits(Tokenizer.load(ckpt_dir / tag), config["model"]["vocab_size"], dataset)
    rank, world = rank_and_world()
    with Tracker(enabled=rank == 0) as progress:
        with progress.phase(f"loading {ckpt_dir / tag}"):
            model, tokenizer = load_model(ckpt_dir / tag, dtype=dtype)
            device = torch.device(device) if device is not None else _default_device()
            model.to(device)

        n = len(dataset) if max_samples is None else min(max_samples, len(dataset))
        indices = shard_indices(n, rank, world)
        task = progress.add_task(f"scoring {split}", len(indices), "samples")
        nats, tokens, n_bytes = loss_totals(
            model,
            dataset,
            indices,
            batch_size,
            device,
            byte_lengths=token_byte_lengths(tokenizer),
            doc_mask=bool(model.cfg.doc_mask),  # as the checkpoint was trained
            on_batch=lambda k: progress.update(task, advance=k),
        )
    loss = nats / tokens if tokens else float("nan")
    return {
        "loss": loss,
        "ppl": perplexity(loss),
        "bpb": nats / LN2 / n_bytes if n_bytes else float("nan"),
        "tokens": tokens,
        "bytes": n_bytes,
        "samples": n,
        "seq_len": seq_len,
        "split": split,
        "checkpoint": str(ckpt_dir / tag),
    }


def eval_command(
    checkpoint_path: str,
    data: str | None,
    tasks: str | None,
    split: str,
    seq_len: int | None,
    batch_size: int,
    max_samples: int | None,
    limit: float | None,
    num_fewshot: int | None,
    include_path: str | None,
    dtype: str,
    device: str | None,
    as_json: bool,
    trust_checkpoint: bool = False,
) -> int:
    """`dsfm eval`: loss, perplexity and bits per byte on `data`, or benchmarks on `tasks`."""
    checkpoint.trust_pickles(trust_checkpoint)
    if (data is None) == (tasks is None):
        raise ValueError(
            "give --data DIR (loss, perplexity, bits per byte on a prepared split) or "
            "--tasks a,b (lm-evaluation-harness benchmarks), not both or neither"
        )
    if tasks is not None:
        misplaced = {"--split": split != "val", "--seq-len": seq_len, "--max-samples": max_samples}
        mode = "--data"
    else:
        misplaced = {"--limit": limit, "--num-fewshot": num_fewshot, "--include-path": include_path}
        mode = "--tasks"
    wrong = [flag for flag, value in misplaced.items() if value not in (None, False)]
    if wrong:
        raise ValueError(f"{', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} only for {mode}")
    if tasks is not None:
        from dsfm.eval.benchmark import benchmark_command

        return benchmark_command(
            checkpoint_path,
            tasks,
            limit=limit,
            num_fewshot=num_fewshot,
            include_path=include_path,
            batch_size=batch_size,
            dtype=dtype,
            device=device,
            as_json=as_json,
        )
    result = evaluate_checkpoint(
        checkpoint_path,
        data,
        split=split,
        seq_len=seq_len,
        batch_size=batch_size,
        max_samples=max_samples,
        dtype=dtype,
        device=device,
    )
    if as_json:
        print(json.dumps(result))
    else:
        print(
            f"{result['split']}: loss {result['loss']:.4f} | ppl {result['ppl']:.2f} | "
            f"bpb {result['bpb']:.4f} | {result['tokens']:,} tokens, {result['samples']} samples"
        )
    return 0
