"""Autoregressive sampling from a `GPT`: eval-time samples and `dsfm generate`.

Design choices:
- Randomness comes from a private `torch.Generator`, never the global RNG: the trainer
  samples mid-run, and exact resume needs the global RNG stream to be untouched.
- The KV cache path (default) and the recompute-everything path (`use_cache=False`) draw
  from the generator identically, so the second is a reference for the first.
- Filtering order is temperature -> top-k -> top-p, as in Hugging Face `generate`.
- One sequence at a time: samples are a handful of prompts, so batching them (and the
  padding it needs) is not worth the code.
- `sample` takes ids and returns ids; `generate_command` adds the checkpoint, the tokenizer
  and, with `--chat`, the chat template around it.
"""

from __future__ import annotations

import torch

from dsfm.data.chat import prompt_ids as make_prompt
from dsfm.interop.weights import load_model
from dsfm.model.gpt import GPT


def _check_args(
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    max_seq_len: int,
) -> None:
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids is empty; pass at least one token (e.g. the EOT id)")
    if len(prompt_ids) > max_seq_len:
        raise ValueError(
            f"prompt of {len(prompt_ids)} tokens exceeds the model's max_seq_len={max_seq_len}"
        )
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not temperature >= 0:  # also rejects NaN
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None to disable), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (or None to disable), got {top_p}")


def _filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set the logits (V,) of tokens outside top-k / the top-p nucleus to -inf."""
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the tokens ranked above it already cover top_p; the first always stays.
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator,
) -> int:
    logits = logits.float()  # (V,); bf16 logits make a coarse softmax
    if temperature == 0:
        return int(logits.argmax())
    logits = _filter_logits(logits / temperature, top_k, top_p)
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def sample(
    model: GPT,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eot_id: int | None = None,
    use_cache: bool = True,
) -> list[int]:
    """Continue `prompt_ids`; return only the new tokens.

    Stops after `max_new_tokens`, when prompt + output reaches the model's `max_seq_len`,
    or when `eot_id` is drawn (the EOT itself is not returned). `temperature=0` is greedy
    and ignores top_k/top_p. `seed=None` draws a fresh seed, still without touching the
    global RNG. The model is put in eval mode and its previous mode restored.
    """
    max_seq_len = model.cfg.max_seq_len
    _check_args(prompt_ids, max_new_tokens, temperature, top_k, top_p, max_seq_len)
    budget = min(max_new_tokens, max_seq_len - len(prompt_ids))
    if budget <= 0:
        return []

    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()  # non-deterministic, and private to this call
    else:
        generator.manual_seed(seed)

    was_training = model.training
    model.eval()
    try:
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
        # The last drawn token is never fed back, hence the - 1.
        cache = model.new_cache(1, max_len=len(prompt_ids) + budget - 1) if use_cache else None
        logits = model(ids, cache=cache)[0, -1]  # (V,)
        out: list[int] = []
        for step in range(budget):
            token = _next_token(logits, temperature, top_k, top_p, generator)
            if token == eot_id:
                break
            out.append(token)
            if step == budget - 1:
                break
            new = torch.tensor([[token]], dtype=torch.long, device=device)  # (1, 1)
            if cache is not None:
                logits = model(new, cache=cache)[0, -1]
            else:
                ids = torch.cat([ids, new], dim=1)  # (1, T + step + 1)
                logits = model(ids)[0, -1]
        return out
    finally:
        model.train(was_training)


def generate_command(
    checkpoint_path: str,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int,
    dtype: str,
    no_cache: bool,
    chat: bool,
) -> int:
    model, tokenizer = load_model(checkpoint_path, dtype=dtype)
    ids, stop_id = make_prompt(tokenizer, prompt, chat=chat)
    new = sample(
        model,
        ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        eot_id=stop_id,
        use_cache=not no_cache,
    )
    print(tokenizer.decode(new) if chat else prompt + tokenizer.decode(new))
    return 0
