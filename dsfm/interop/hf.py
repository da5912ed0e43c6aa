"""Hugging Face Llama export and import: dsfm checkpoints <-> `LlamaForCausalLM` directories.

Design choices:
- The model already uses HF Llama's module names and RoPE convention, so both directions
  are a rename (`model.` prefix on everything but `lm_head`) plus a config translation.
  No transformers import is needed: config.json, tokenizer_config.json and
  generation_config.json are written by hand as JSON, and weights go through safetensors.
- Export reads any checkpoint `weights.load_weights` reads (DeepSpeed tag of any ZeRO
  stage, consolidated on CPU in one process, or a plain checkpoint), checks every tensor
  against a shape-only (meta device) model built from the checkpoint's own config, and
  writes the tensors shard by shard, converting to the target dtype one shard at a time so
  peak memory is the fp32 weights plus one shard.
- A tied LM head is omitted from the files (`tie_word_embeddings` tells HF to share it).
- LoRA adapters are never exported unmerged: HF Llama has no place for them, and dropping
  them would silently ship the base model. `weights.load_weights` folds them in when the
  config says LoRA; leftover `lora_A`/`lora_B` tensors are refused ("run `dsfm merge`").
- The tokenizer.json is copied byte for byte, so `AutoTokenizer` produces the ids the model
  was trained on. The special tokens are the tokenizer's own (`Tokenizer`: for dsfm's
  tokenizers EOT is bos, eos and pad and no BOS is added; a model's keep its BOS, EOS and
  `add_bos_token`). A chat model's tokenizer_config.json gets a `chat_template` (the
  model's own, or dsfm's template as Jinja, `chat.jinja_template`) and its end of turn as
  `eos_token`; `eos_token_id` in config.json and generation_config.json lists the end of
  text and the end of turn, so transformers and vLLM stop where dsfm's generate stops.
  One difference remains by design: HF parses special tokens written literally in text
  (chat templates rely on it) where dsfm's encoder keeps "<|endoftext|>" in text as bytes.
- Import accepts only what our model computes exactly: model_type "llama", plain RoPE (no
  rope_scaling), no biases, head_dim = hidden / heads, SiLU. Anything else is a clear error
  naming the field, never a silently different model. A tokenizer without
  "<|endoftext|>" gets it added as a special token (dsfm separates documents with it); if
  its id falls outside the embedding, the embedding and LM head grow by one row, set to the
  mean of the existing rows, so every other token's logits are unchanged.
- Both directions write to a temp directory and rename it (`dsfm.atomic`), and refuse an
  existing output before any work.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from dsfm.atomic import refuse_existing, staged_dir
from dsfm.config.load import from_dict, to_dict
from dsfm.config.schema import Config, ConfigError
from dsfm.data.chat import end_of_turn_id, jinja_template
from dsfm.data.tokenizer import (
    EOT,
    SPECIAL_TOKENS_MAP,
    TOKENIZER_CONFIG,
    TOKENIZER_FILE,
    Tokenizer,
    copy_tokenizer,
    read_config,
)
from dsfm.interop.weights import check_weights, expected_shapes, load_weights, save_plain
from dsfm.model.config import ModelConfig
from dsfm.train import checkpoint

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
HF_DTYPE_NAMES = {"bf16": "bfloat16", "fp32": "float32"}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HF_PREFIX = "model."
HF_CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


# ---------------------------------------------------------------------------------------
# Export


def hf_config(cfg: ModelConfig, eot_id: int, dtype: str) -> dict[str, Any]:
    """config.json of the `LlamaForCausalLM` that computes what a GPT of `cfg` computes."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # Top-level rope_theta: transformers 4.x reads it and 5.x still accepts it.
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "pad_token_id": eot_id,
        "use_cache": True,
        "torch_dtype": HF_DTYPE_NAMES[dtype],
    }


def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Names grouped greedily in order into shards of at most `max_shard_bytes`.

    A tensor larger than the limit gets a shard of its own (tensors are never split).
    """
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def _special_ids(tokenizer: Tokenizer) -> dict[str, Any]:
    """bos/eos/pad ids for config.json and generation_config.json: eos lists the end of text
    and, for a chat model, the end of turn (generation stops at either)."""
    end_of_turn = end_of_turn_id(tokenizer)
    eos = [tokenizer.eot_id] + [
        i for i in (end_of_turn, tokenizer.eos_id) if i is not None and i != tokenizer.eot_id
    ]
    return {
        "bos_token_id": tokenizer.bos_id if tokenizer.config else tokenizer.eot_id,
        "eos_token_id": list(dict.fromkeys(eos)) if len(set(eos)) > 1 else eos[0],
        "pad_token_id": tokenizer.eot_id if tokenizer.pad_id is None else tokenizer.pad_id,
    }


def _tokenizer_files(tokenizer: Tokenizer, model_max_length: int) -> dict[str, dict[str, Any]]:
    """tokenizer_config.json and special_tokens_map.json for `PreTrainedTokenizerFast`."""
    added = tokenizer.hf_tokenizer.get_added_tokens_decoder()  # {id: AddedToken}
    eot = tokenizer.token(tokenizer.eot_id)
    extra = [t.content for _, t in sorted(added.items()) if t.special and t.content != eot]
    end_of_turn = end_of_turn_id(tokenizer)
    template = tokenizer.chat_template or (end_of_turn is not None and jinja_template(tokenizer))
    own = tokenizer.config  # a model's tokenizer: its own roles; dsfm's: EOT for all three
    tokens = {
        "bos_token": tokenizer.token(tokenizer.bos_id) if own else eot,
        # transformers' generate and chat pipelines stop at eos_token: a chat model's is
        # its end of turn (as in Llama-3 and Qwen instruct configs)
        "eos_token": tokenizer.token(end_of_turn if end_of_turn is not None else tokenizer.eos_id)
        or eot,
        "pad_token": tokenizer.token(tokenizer.pad_id) or eot,
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **tokens,
        "unk_token": None,
        "additional_special_tokens": extra,
        # what dsfm trained with: BOS before a text where the family has it, never EOS
        "add_bos_token": tokenizer.add_bos,
        "add_eos_token": False,
        # Byte-level decoding is exact; HF's cleanup would rewrite " ." as ".".
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "added_tokens_decoder": {
            str(i): {
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            }
            for i, t in sorted(added.items())
        },
    }
    if template:
        tokenizer_config["chat_template"] = template
    special_tokens_map = {**tokens, "additional_special_tokens": extra}
    return {TOKENIZER_CONFIG: tokenizer_config, SPECIAL_TOKENS_MAP: special_tokens_map}


def export_hf(
    checkpoint_path: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "bf16",
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Write a Hugging Face Llama directory from any dsfm checkpoint; return its path.

    `checkpoint_path` is anything `checkpoint.resolve` accepts (run dir, checkpoints dir,
    tag dir of any ZeRO stage, plain checkpoint). Weights above `max_shard_bytes` in total
    are split into `model-0000i-of-0000N.safetensors` plus an index.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    out = Path(out_dir)
    refuse_existing(out)  # before the (possibly long) weight consolidation
    from safetensors.torch import save_file

    ckpt_dir, tag = checkpoint.resolve(checkpoint_path)
    where = str(ckpt_dir / tag)
    state = checkpoint.client_state(ckpt_dir, tag)
    cfg = from_dict(state["config"]).model
    tokenizer = Tokenizer.load(ckpt_dir / tag)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"{where}: tokenizer has {tokenizer.vocab_size} ids but the model's "
            f"vocab_size is {cfg.vocab_size}"
        )
    weights = load_weights(ckpt_dir, tag, state)
    check_weights(weights, cfg, where)

    torch_dtype = DTYPES[dtype]
    names = [k for k in expected_shapes(cfg) if not (cfg.tie_embeddings and k == "lm_head.weight")]
    sizes = {k: weights[k].numel() * torch_dtype.itemsize for k in names}
    shards = plan_shards(sizes, max_shard_bytes)
    files = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    with staged_dir(out) as tmp:
        for file, shard in zip(files, shards):
            # copy=True: fresh contiguous storage, so no two entries share memory
            tensors = {
                _hf_name(k): weights[k].detach().to(torch_dtype, copy=True).contiguous()
                for k in shard
            }
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            del tensors
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(sizes.values())},
                "weight_map": {_hf_name(k): f for f, s in zip(files, shards) for k in s},
            }
            _write_json(tmp / INDEX_FILE, index)
        special_ids = _special_ids(tokenizer)
        _write_json(tmp / HF_CONFIG, {**hf_config(cfg, tokenizer.eot_id, dtype), **special_ids})
        _write_json(tmp / GENERATION_CONFIG, special_ids)
        copy_tokenizer(ckpt_dir / tag, tmp)
        for name, obj in _tokenizer_files(tokenizer, cfg.max_seq_len).items():
            _write_json(tmp / name, obj)
        # safetensors writes its files owner-only; give them the umask-derived mode the
        # JSON files got, so a shared export directory is readable like any other.
        for file in files:
            shutil.copymode(tmp / HF_CONFIG, tmp / file)
    return out


def _hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else HF_PREFIX + name


# ---------------------------------------------------------------------------------------
# Import


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """A full dsfm config dict (defaults + the model section) for an HF Llama config.json.

    Raises ValueError naming every field our model cannot reproduce exactly.
    """
    problems = []
    model_type = hf.get("model_type")
    if model_type != "llama":
        problems.append(f"model_type={model_type!r} (only 'llama' is supported)")
    archs = hf.get("architectures") or ["LlamaForCausalLM"]
    if "LlamaForCausalLM" not in archs:
        problems.append(f"architectures={archs} (need LlamaForCausalLM)")
    if hf.get("rope_scaling"):
        problems.append(f"rope_scaling={hf['rope_scaling']!r} (only plain RoPE is supported)")
    rope = hf.get("rope_parameters") or {}  # transformers 5.x keeps theta and scaling here
    if rope.get("rope_type", "default") != "default":
        problems.append(
            f"rope_parameters.rope_type={rope['rope_type']!r} (only plain RoPE is supported)"
        )
    for bias in ("attention_bias", "mlp_bias"):
        if hf.get(bias):
            problems.append(f"{bias}=true (dsfm's Llama has no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (only silu is supported)")
    required = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    )
    absent = [k for k in required if not isinstance(hf.get(k), int)]
    if absent:
        problems.append(f"missing or non-integer {', '.join(absent)}")
    else:
        head_dim = hf.get("head_dim")
        natural = hf["hidden_size"] // hf["num_attention_heads"]
        if head_dim is not None and head_dim != natural:
            problems.append(
                f"head_dim={head_dim} != hidden_size / num_attention_heads = {natural} "
                "(dsfm derives the head size from the width)"
            )
    if problems:
        raise ValueError("unsupported Hugging Face config: " + "; ".join(problems))

    d = to_dict(Config())
    max_seq_len = int(hf.get("max_position_embeddings", 2048))
    d["model"].update(
        preset=None,
        vocab_size=hf["vocab_size"],
        n_layers=hf["num_hidden_layers"],
        d_model=hf["hidden_size"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        ffn_hidden=hf["intermediate_size"],
        max_seq_len=max_seq_len,
        rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dropout=0.0,
        init_std=float(hf.get("initializer_range", 0.02)),
    )
    # The training default must fit the imported context; fine-tuning configs override it.
    d["train"]["seq_len"] = min(d["train"]["seq_len"], max_seq_len)
    try:
        from_dict(d)
    except ConfigError as e:
        raise ValueError(f"the Hugging Face config maps to an invalid dsfm config: {e}") from e
    return d


def _read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a single-file or sharded safetensors checkpoint, as fp32."""
    from safetensors.torch import load_file

    if (hf_dir / INDEX_FILE).is_file():
        weight_map = json.loads((hf_dir / INDEX_FILE).read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (hf_dir / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise FileNotFoundError(
            f"{hf_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}; only safetensors weights "
            "are read (re-save the model with `save_pretrained(..., safe_serialization=True)`)"
        )
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update({k: v.float() for k, v in load_file(str(hf_dir / file)).items()})
    return weights


def _strip_prefix(weights: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in weights.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer older transformers saved; we compute RoPE per call
        out[name.removeprefix(HF_PREFIX)] = tensor
    if tied and "lm_head.weight" in out:
        # Loading both into a tied model would let the head overwrite the embedding.
        if not torch.equal(out["lm_head.weight"], out["embed_tokens.weight"]):
            raise ValueError(
                "tie_word_embeddings is true but lm_head.weight differs from "
                "model.embed_tokens.weight; the checkpoint is inconsistent"
            )
        del out["lm_head.weight"]
    return out


def _grow_vocab(weights: dict[str, torch.Tensor], new_size: int) -> None:
    """Append rows (the mean of the existing ones) to the embedding and an untied head."""
    for name in ("embed_tokens.weight", "lm_head.weight"):
        if name in weights:
            w = weights[name]
            extra = w.mean(0, keepdim=True).expand(new_size - w.shape[0], -1)
            weights[name] = torch.cat([w, extra])


def import_hf(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """A local Hugging Face Llama directory -> a plain dsfm checkpoint at `out_dir`.

    Needs config.json, safetensors weights (one file, or shards with an index) and a
    tokenizer.json; its config files come along. If the tokenizer has no end of text of its
    own (no eos_token, no "<|endoftext|>"), "<|endoftext|>" is added as a special token
    (dsfm's document separator), growing the vocabulary by one row when needed.
    """
    src = Path(hf_dir)
    out = Path(out_dir)
    refuse_existing(out)
    config_file = src / HF_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found; is {src} a Hugging Face model dir?")
    tok_file = src / TOKENIZER_FILE
    if not tok_file.is_file():
        raise FileNotFoundError(
            f"{src} has no {TOKENIZER_FILE}: dsfm needs the fast-tokenizer file (load the "
            "tokenizer with transformers and `save_pretrained` it to write one)"
        )
    config = config_from_hf(json.loads(config_file.read_text()))
    m = config["model"]

    import tokenizers

    hf_tok = tokenizers.Tokenizer.from_file(str(tok_file))
    tok_config = read_config(src)  # its BOS/EOS and chat template travel with it
    try:
        Tokenizer(tokenizers.Tokenizer.from_file(str(tok_file)), tok_config)
        added_eot = False  # it has an end of text of its own
    except ValueError:
        added_eot = hf_tok.token_to_id(EOT) is None
    if added_eot:
        hf_tok.add_special_tokens([EOT])
    n_ids = hf_tok.get_vocab_size(with_added_tokens=True)
    if n_ids > m["vocab_size"] + int(added_eot):
        raise ValueError(
            f"{tok_file} has {n_ids} ids but the model's vocab_size is {m['vocab_size']}"
        )

    weights = _strip_prefix(_read_hf_weights(src), m["tie_embeddings"])
    if n_ids > m["vocab_size"]:  # the added EOT has no row yet
        _grow_vocab(weights, n_ids)
        m["vocab_size"] = n_ids
    check_weights(weights, from_dict(config).model, str(src))

    state = {"config": config, "step": 0, "imported_from": str(src.resolve())}
    if not added_eot:
        Tokenizer.load(tok_file)  # fail here, not at first use, if dsfm cannot read it
        return save_plain(out, weights, state, tok_file)  # byte-identical copy
    state["added_tokens"] = [EOT]
    with tempfile.TemporaryDirectory() as tmp:
        tok_path = Tokenizer(hf_tok, tok_config).save(tmp)
        Tokenizer.load(tok_path)
        return save_plain(out, weights, state, tok_path)


def export_command(checkpoint_path: str, out: str, dtype: str) -> int:
    print(f"wrote Hugging Face Llama directory {export_hf(checkpoint_path, out, dtype=dtype)}")
    return 0


def import_command(hf_dir: str, out: str) -> int:
    path = import_hf(hf_dir, out)
    print(f"wrote {path}: start from it with train.init_from={path}")
    return 0
