"""Hugging Face export and import: dsfm checkpoints <-> Llama, Mistral and Qwen2 directories.

Design choices:
- The model already uses HF Llama's module names and RoPE convention, so both directions
  are a rename (`model.` prefix on everything but `lm_head`) plus a config translation.
  Mistral is the same network under its own name and Qwen2 adds q/k/v biases; the model's
  `family` field says which config.json export writes, so a Qwen2 import exports as Qwen2.
  No transformers import is needed: config.json, tokenizer_config.json and
  generation_config.json are written by hand as JSON, and weights go through safetensors.
- Export reads any checkpoint `weights.load_weights` reads (DeepSpeed tag of any ZeRO
  stage, consolidated on CPU in one process, or a plain checkpoint), checks every tensor
  against a shape-only (meta device) model built from the checkpoint's own config, and
  writes the tensors shard by shard, converting to the target dtype one shard at a time so
  peak memory is the fp32 weights plus one shard.
- A tied LM head is omitted from the files (`tie_word_embeddings` tells HF to share it).
- A model directory never holds unmerged LoRA adapters: HF has no place for them, and
  dropping them would silently ship the base model. `weights.load_weights` folds them in
  when the config says LoRA; leftover `lora_A`/`lora_B` tensors are refused ("run `dsfm
  merge`"). `export_adapter` writes them alone in PEFT's format instead (`adapter.py`).
- The tokenizer.json is copied byte for byte, so `AutoTokenizer` produces the ids the model
  was trained on. The special tokens are the tokenizer's own (`Tokenizer`: for dsfm's
  tokenizers EOT is bos, eos and pad and no BOS is added; a model's keep its BOS, EOS and
  `add_bos_token`). A chat model's tokenizer_config.json gets a `chat_template` (the
  model's own, or dsfm's template as Jinja, `chat.jinja_template`) and its end of turn as
  `eos_token`; `eos_token_id` in config.json and generation_config.json lists the end of
  text and the end of turn, so transformers and vLLM stop where dsfm's generate stops.
  One difference remains by design: HF parses special tokens written literally in text
  (chat templates rely on it) where dsfm's encoder keeps "<|endoftext|>" in text as bytes.
- Import (a directory, or a hub id through the HF cache: `dsfm.hub.local_path`) accepts
  only what our model computes exactly: model_type llama, mistral or qwen2; RoPE plain or
  scaled `linear`/`llama3` (read from transformers 4.x `rope_scaling` or 5.x
  `rope_parameters`); no biases beyond Qwen2's; head_dim = hidden / heads; SiLU; no
  experts. Anything else is one error naming the fields and what is supported, never a
  silently different model. A sliding window shorter than max_position_embeddings
  (Mistral v0.1) caps max_seq_len at the window: up to it, full attention is windowed
  attention, and longer inputs are refused rather than computed differently.
- A tokenizer without "<|endoftext|>" gets it added as a special token (dsfm separates
  documents with it); if its id falls outside the embedding, the embedding and LM head
  grow by one row, set to the mean of the existing rows, so every other token's logits are
  unchanged.
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
from dsfm.hub import local_path
from dsfm.interop.adapter import write_adapter
from dsfm.interop.weights import (
    check_weights,
    expected_shapes,
    load_unmerged,
    load_weights,
    save_plain,
)
from dsfm.model.config import ROPE_SCALINGS, ModelConfig
from dsfm.model.lora import LORA_PARAMS
from dsfm.progress import Tracker
from dsfm.train import checkpoint

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
HF_DTYPE_NAMES = {"bf16": "bfloat16", "fp32": "float32"}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HF_PREFIX = "model."
HF_CONFIG = "config.json"
# model_type -> the causal-LM class transformers builds for it (dsfm's `model.family`)
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
SUPPORTED = (
    "supported: model_type llama (Llama 1-3.x, SmolLM2; rope_scaling none, linear or llama3), "
    "mistral and qwen2 (Qwen2/2.5), dense (no mixture of experts), SiLU MLP, "
    "head_dim = hidden_size / num_attention_heads"
)
GENERATION_CONFIG = "generation_config.json"


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


# ---------------------------------------------------------------------------------------
# Export


def hf_config(cfg: ModelConfig, eot_id: int, dtype: str) -> dict[str, Any]:
    """config.json of the Hugging Face model (`cfg.family`: Llama, Mistral or Qwen2) that
    computes what a GPT of `cfg` computes."""
    return {
        "architectures": [ARCHITECTURES[cfg.family]],
        "model_type": cfg.family,
        **_family_fields(cfg),
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
        # Top-level rope_theta and rope_scaling: transformers 4.x reads them and 5.x still
        # accepts them (it folds them into rope_parameters).
        "rope_theta": cfg.rope_theta,
        "rope_scaling": _rope_scaling(cfg),
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "pad_token_id": eot_id,
        "use_cache": True,
        "torch_dtype": HF_DTYPE_NAMES[dtype],
    }


def _family_fields(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json fields one family has and the others lack, set to what we compute."""
    if cfg.family == "llama":
        return {"attention_bias": False, "mlp_bias": False}
    if cfg.family == "mistral":
        return {"sliding_window": None}  # attention over the whole context
    return {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layers}


def _rope_scaling(cfg: ModelConfig) -> dict[str, Any] | None:
    if cfg.rope_scaling is None:
        return None
    scaling = {"rope_type": cfg.rope_scaling, "factor": cfg.rope_factor}
    if cfg.rope_scaling == "llama3":
        scaling.update(
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_len,
        )
    return scaling


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
    with Tracker() as progress:
        with progress.phase(f"reading {where}"):
            weights = load_weights(ckpt_dir, tag, state)
        check_weights(weights, cfg, where)
        _write_hf(out, weights, cfg, tokenizer, ckpt_dir / tag, dtype, max_shard_bytes, progress)
    return out


def _write_hf(
    out: Path,
    weights: dict[str, torch.Tensor],
    cfg: ModelConfig,
    tokenizer: Tokenizer,
    tag_dir: Path,
    dtype: str,
    max_shard_bytes: int,
    progress: Tracker,
) -> None:
    from safetensors.torch import save_file

    torch_dtype = DTYPES[dtype]
    names = [k for k in expected_shapes(cfg) if not (cfg.tie_embeddings and k == "lm_head.weight")]
    sizes = {k: weights[k].numel() * torch_dtype.itemsize for k in names}
    shards = plan_shards(sizes, max_shard_bytes)
    files = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    task = progress.add_task(f"writing {out} ({dtype})", sum(sizes.values()), "B")
    with staged_dir(out) as tmp:
        for file, shard in zip(files, shards):
            # copy=True: fresh contiguous storage, so no two entries share memory
            tensors = {
                _hf_name(k): weights[k].detach().to(torch_dtype, copy=True).contiguous()
                for k in shard
            }
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            del tensors
            progress.update(task, advance=sum(sizes[k] for k in shard), detail=file)
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(sizes.values())},
                "weight_map": {_hf_name(k): f for f, s in zip(files, shards) for k in s},
            }
            _write_json(tmp / INDEX_FILE, index)
        special_ids = _special_ids(tokenizer)
        _write_json(tmp / HF_CONFIG, {**hf_config(cfg, tokenizer.eot_id, dtype), **special_ids})
        _write_json(tmp / GENERATION_CONFIG, special_ids)
        copy_tokenizer(tag_dir, tmp)
        for name, obj in _tokenizer_files(tokenizer, cfg.max_seq_len).items():
            _write_json(tmp / name, obj)
        # safetensors writes its files owner-only; give them the umask-derived mode the
        # JSON files got, so a shared export directory is readable like any other.
        for file in files:
            shutil.copymode(tmp / HF_CONFIG, tmp / file)


def _hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else HF_PREFIX + name


def export_adapter(
    checkpoint_path: str | Path, out_dir: str | Path, *, dtype: str = "bf16"
) -> Path:
    """A LoRA run's adapters as a PEFT adapter directory, with the run's tokenizer.

    It applies to the exported base the run started from (`train.init_from`); when the run
    grew the vocabulary, the embedding and LM head it trained in full go in too (see
    `dsfm.interop.adapter`).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    refuse_existing(out)
    ckpt_dir, tag = checkpoint.resolve(checkpoint_path)
    where = str(ckpt_dir / tag)
    state = checkpoint.client_state(ckpt_dir, tag)
    config = from_dict(state["config"])
    if config.lora.rank < 1:
        raise ValueError(
            f"{where} has no LoRA adapters (lora.rank is 0); export it without --adapter"
        )
    grown = config.model.vocab_size > _base_vocab_size(config, where)
    with Tracker() as progress, progress.phase(f"reading {where}"):
        weights = load_unmerged(ckpt_dir, tag, state)
    names = [k for k in weights if k.endswith(LORA_PARAMS)]
    if not names:
        raise ValueError(f"{where} holds no lora_A/lora_B tensors; export it without --adapter")
    if grown:  # trained in full alongside the adapters (`dsfm.train.build`)
        names += ["embed_tokens.weight"] + (
            [] if config.model.tie_embeddings else ["lm_head.weight"]
        )
    tokenizer = Tokenizer.load(ckpt_dir / tag)
    with staged_dir(out) as tmp:
        tensors = {_hf_name(k): weights[k] for k in names}
        write_adapter(tmp, tensors, state["config"]["lora"], None, DTYPES[dtype])
        copy_tokenizer(ckpt_dir / tag, tmp)
        for name, obj in _tokenizer_files(tokenizer, config.model.max_seq_len).items():
            _write_json(tmp / name, obj)
    return out


def _base_vocab_size(config: Config, where: str) -> int:
    """The vocabulary of the checkpoint a run started from (its own when none)."""
    if config.train.init_from is None:
        return config.model.vocab_size
    try:
        base = checkpoint.client_state(*checkpoint.resolve(config.train.init_from))
    except (FileNotFoundError, ValueError) as e:
        raise FileNotFoundError(
            f"{where} started from {config.train.init_from}, which cannot be read ({e}); the "
            "adapter applies to that base, so export needs it to know what the run changed"
        ) from e
    return base["config"]["model"]["vocab_size"]


# ---------------------------------------------------------------------------------------
# Import


def _rope_from_hf(hf: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """dsfm's RoPE fields from transformers 4.x (`rope_theta`, `rope_scaling`) or 5.x
    (`rope_parameters`) spelling."""
    params = hf.get("rope_parameters") or {}
    theta = float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))
    params = hf.get("rope_scaling") or params  # a 4.x rope_scaling wins over 5.x defaults
    kind = params.get("rope_type", params.get("type", "default"))
    fields: dict[str, Any] = {"rope_theta": theta}
    if kind == "default":
        return fields
    if kind not in ROPE_SCALINGS:
        problems.append(f"RoPE scaling type {kind!r} (we do none, {', '.join(ROPE_SCALINGS)})")
        return fields
    fields.update(rope_scaling=kind, rope_factor=float(params.get("factor", 1.0)))
    if kind == "llama3":
        fields.update(
            rope_low_freq_factor=float(params["low_freq_factor"]),
            rope_high_freq_factor=float(params["high_freq_factor"]),
            rope_original_max_len=int(params["original_max_position_embeddings"]),
        )
    return fields


def _attention_window(hf: dict[str, Any]) -> int | None:
    """The sliding attention window when any layer uses one (Mistral v0.1, Qwen2 with
    `use_sliding_window`), else None."""
    window = hf.get("sliding_window")
    if hf.get("model_type") == "qwen2" and not hf.get("use_sliding_window"):
        return None
    return int(window) if window else None


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """A full dsfm config dict (defaults + the model section) for a Hugging Face config.json
    of a Llama, Mistral or Qwen2 model.

    Raises ValueError naming every field our model cannot reproduce exactly, and what is
    supported. A sliding attention window shorter than the context caps `max_seq_len` at the
    window: within it, windowed and full attention are the same computation.
    """
    problems = []
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        problems.append(f"model_type={model_type!r}")
    else:
        archs = hf.get("architectures") or [ARCHITECTURES[model_type]]
        if ARCHITECTURES[model_type] not in archs:
            problems.append(f"architectures={archs} (need {ARCHITECTURES[model_type]})")
    experts = [k for k in ("num_local_experts", "num_experts", "n_routed_experts") if hf.get(k)]
    if experts:
        problems.append(f"{experts[0]}={hf[experts[0]]} (a mixture of experts)")
    rope = _rope_from_hf(hf, problems)
    # Qwen2's q/k/v biases come with the family; Llama's flags would add o_proj/MLP biases.
    for bias in ("attention_bias", "mlp_bias"):
        if hf.get(bias):
            problems.append(f"{bias}=true (biases beyond Qwen2's q/k/v)")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r}")
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
        raise ValueError(f"unsupported Hugging Face config: {'; '.join(problems)} ({SUPPORTED})")

    d = to_dict(Config())
    max_seq_len = int(hf.get("max_position_embeddings", 2048))
    window = _attention_window(hf)
    if window is not None:
        max_seq_len = min(max_seq_len, window)
    d["model"].update(
        preset=None,
        family=model_type,
        vocab_size=hf["vocab_size"],
        n_layers=hf["num_hidden_layers"],
        d_model=hf["hidden_size"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        ffn_hidden=hf["intermediate_size"],
        max_seq_len=max_seq_len,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dropout=0.0,
        init_std=float(hf.get("initializer_range", 0.02)),
        **rope,
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


def import_hf(name: str | Path, out_dir: str | Path) -> Path:
    """A Hugging Face model (a local directory, or a hub id resolved through the HF cache by
    `dsfm.hub.local_path`) -> a plain dsfm checkpoint at `out_dir`.

    Needs config.json, safetensors weights (one file, or shards with an index) and a
    tokenizer.json; its config files come along. If the tokenizer has no end of text of its
    own (no eos_token, no "<|endoftext|>"), "<|endoftext|>" is added as a special token
    (dsfm's document separator), growing the vocabulary by one row when needed.
    """
    out = Path(out_dir)
    refuse_existing(out)
    src = local_path(str(name))
    config_file = src / HF_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found; is {src} a Hugging Face model dir?")
    tok_file = src / TOKENIZER_FILE
    if not tok_file.is_file():
        raise FileNotFoundError(
            f"{src} has no {TOKENIZER_FILE}: dsfm needs the fast-tokenizer file (load the "
            "tokenizer with transformers and `save_pretrained` it to write one)"
        )
    hf = json.loads(config_file.read_text())
    config = config_from_hf(hf)
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

    progress = Tracker()
    with progress, progress.phase(f"reading {src}"):
        weights = _strip_prefix(_read_hf_weights(src), m["tie_embeddings"])
    if n_ids > m["vocab_size"]:  # the added EOT has no row yet
        _grow_vocab(weights, n_ids)
        m["vocab_size"] = n_ids
    check_weights(weights, from_dict(config).model, str(src))

    state = {"config": config, "step": 0, "imported_from": str(src.resolve())}
    if m["max_seq_len"] < hf.get("max_position_embeddings", m["max_seq_len"]):
        state["notes"] = [
            f"max_seq_len is {m['max_seq_len']}, the sliding attention window, not "
            f"max_position_embeddings={hf['max_position_embeddings']}: dsfm attends to the "
            "whole context, which equals windowed attention up to the window"
        ]
    with progress, progress.phase(f"writing {out}"):
        if not added_eot:
            Tokenizer.load(tok_file)  # fail here, not at first use, if dsfm cannot read it
            return save_plain(out, weights, state, tok_file)  # byte-identical copy
        state["added_tokens"] = [EOT]
        with tempfile.TemporaryDirectory() as tmp:
            tok_path = Tokenizer(hf_tok, tok_config).save(tmp)
            Tokenizer.load(tok_path)
            return save_plain(out, weights, state, tok_path)


def export_command(
    checkpoint_path: str,
    out: str,
    dtype: str,
    adapter: bool = False,
    trust_checkpoint: bool = False,
) -> int:
    checkpoint.trust_pickles(trust_checkpoint)
    if adapter:
        path = export_adapter(checkpoint_path, out, dtype=dtype)
        print(f"wrote PEFT LoRA adapter {path}: load it onto the exported base model")
        return 0
    print(f"wrote Hugging Face model directory {export_hf(checkpoint_path, out, dtype=dtype)}")
    return 0


def import_command(name: str, out: str) -> int:
    path = import_hf(name, out)
    for note in checkpoint.client_state(*checkpoint.resolve(path)).get("notes", []):
        print(f"note: {note}")
    print(f"wrote {path}: start from it with train.init_from={path}")
    return 0
