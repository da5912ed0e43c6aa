"""Autoregressive sampling from a `GPT`: eval-time samples and `dsfm generate`.

Design choices:
- Randomness comes from a private `torch.Generator`, never the global RNG: the trainer
  samples mid-run, and exact resume needs the global RNG stream to be untouched.
- The KV cache path (default) and the recompute-everything path (`use_cache=False`) draw
  from the generator identically, so the second is a reference for the first.
- Filtering order is temperature -> top-k -> top-p, as in Hugging Face `generate`.
- One sequence at a time: samples are a handful of prompts, so batching them (and the
  padding it needs) is not worth the code.
- `stream` yields ids as they are drawn; `sample` is `stream` collected, so the terminal
  (`generate_command`, `dsfm chat`) and the trainer's samples draw from one loop.
  `stream_text` turns ids into printable pieces, holding back a split UTF-8 character.
- `sample`/`stream` take ids and return ids; `generate_command` adds the checkpoint, the
  tokenizer and, with `--chat`, the chat template around it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator

import torch

from dsfm.data.chat import prompt_ids as make_prompt
from dsfm.data.chat import render_prompt
from dsfm.data.tokenizer import Tokenizer
from dsfm.interop.weights import load_model
from dsfm.model.gpt import GPT
from dsfm.train.checkpoint import trust_pickles


def check_args(
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


def sample(model: GPT, prompt_ids: list[int], **options) -> list[int]:
    """Continue `prompt_ids`; return only the new tokens (`stream`'s, collected; the same
    keyword options)."""
    return list(stream(model, prompt_ids, **options))


def stream(
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
) -> Iterator[int]:
    """Continue `prompt_ids`, yielding each new token as soon as it is drawn.

    Stops after `max_new_tokens`, when prompt + output reaches the model's `max_seq_len`,
    or when `eot_id` is drawn (the EOT itself is not yielded). `temperature=0` is greedy
    and ignores top_k/top_p. `seed=None` draws a fresh seed, still without touching the
    global RNG. The model is in eval mode while the stream runs (also when the caller stops
    reading early) and its previous mode is restored after. Arguments are checked at the
    call, not at the first `next`.
    """
    max_seq_len = model.cfg.max_seq_len
    check_args(prompt_ids, max_new_tokens, temperature, top_k, top_p, max_seq_len)
    budget = min(max_new_tokens, max_seq_len - len(prompt_ids))
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()  # non-deterministic, and private to this call
    else:
        generator.manual_seed(seed)
    return _tokens(
        model, prompt_ids, budget, temperature, top_k, top_p, generator, eot_id, use_cache
    )


@torch.no_grad()
def _tokens(
    model: GPT,
    prompt_ids: list[int],
    budget: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator,
    eot_id: int | None,
    use_cache: bool,
) -> Iterator[int]:
    if budget <= 0:
        return
    device = generator.device
    was_training = model.training
    model.eval()
    try:
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
        # The last drawn token is never fed back, hence the - 1.
        cache = model.new_cache(1, max_len=len(prompt_ids) + budget - 1) if use_cache else None
        logits = model(ids, cache=cache)[0, -1]  # (V,)
        for step in range(budget):
            token = _next_token(logits, temperature, top_k, top_p, generator)
            if token == eot_id:
                return
            yield token
            if step == budget - 1:
                return
            new = torch.tensor([[token]], dtype=torch.long, device=device)  # (1, 1)
            if cache is not None:
                logits = model(new, cache=cache)[0, -1]
            else:
                ids = torch.cat([ids, new], dim=1)  # (1, T + step + 1)
                logits = model(ids)[0, -1]
    finally:
        model.train(was_training)


def recorded(tokens: Iterable[int], into: list[int]) -> Iterator[int]:
    """`tokens`, each also appended to `into` (to count them once streamed)."""
    for token in tokens:
        into.append(token)
        yield token


def context_cut(
    prompt_len: int, generated: int, max_new_tokens: int, max_seq_len: int
) -> str | None:
    """Why a generation ended short of `max_new_tokens`, when the context did it (`stream`
    stops where prompt + output fill `max_seq_len`); None otherwise."""
    room = max_seq_len - prompt_len
    if room >= max_new_tokens or generated < room:
        return None
    return (
        f"generation stopped at the model's {max_seq_len}-token context: {generated} of the "
        f"{max_new_tokens} new tokens asked for, after a {prompt_len}-token prompt"
    )


def stream_text(tokenizer: Tokenizer, tokens: Iterable[int]) -> Iterator[str]:
    """The text of `tokens` in pieces, as they arrive; the pieces join to `decode(all)`.

    A token can hold part of a UTF-8 character (byte-level BPE); its text is held back until
    the character completes, so no U+FFFD flickers on the terminal.
    """
    ids: list[int] = []
    shown = ""
    for token in tokens:
        ids.append(token)
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd") and text.startswith(shown):
            yield text[len(shown) :]
            shown = text
    text = tokenizer.decode(ids)
    if len(text) > len(shown):
        yield text[len(shown) :]


def chat_turn(system: str | None, history: list[dict], user: str) -> list[dict]:
    """The messages that ask for the next reply: the system message, the history, `user`."""
    head = [{"role": "system", "content": system}] if system is not None else []
    return [*head, *history, {"role": "user", "content": user}]


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
    system: str | None,
    trust_checkpoint: bool = False,
) -> int:
    trust_pickles(trust_checkpoint)
    if system is not None and not chat:
        raise ValueError("--system is a chat model's system message; add --chat")
    model, tokenizer = load_model(checkpoint_path, dtype=dtype)
    ids, stop_id = make_prompt(tokenizer, prompt, chat=chat)
    if system is not None:
        ids = render_prompt(chat_turn(system, [], prompt), tokenizer)
    if not chat:
        print(prompt, end="", flush=True)
    tokens = stream(
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
    drawn: list[int] = []
    for piece in stream_text(tokenizer, recorded(tokens, drawn)):
        print(piece, end="", flush=True)
    print()
    if cut := context_cut(len(ids), len(drawn), max_new_tokens, model.cfg.max_seq_len):
        print(f"warning: {cut}", file=sys.stderr)
    return 0
