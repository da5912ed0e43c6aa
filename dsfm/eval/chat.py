"""`dsfm chat RUN`: a multi-turn conversation with a chat model in the terminal.

Design choices:
- Each reply is `generate.stream` on the conversation rendered by the run's chat template
  (`data.chat.render_prompt`: dsfm's, or an imported model's own), stopping at its
  end-of-turn token (`data.chat.end_of_turn_id`), seeded with `--seed`
  every turn: a reply equals `dsfm generate --chat` (or `sample`) on the same rendered
  prompt with the same flags, so a conversation can be reproduced turn by turn.
- The context window is the model's `max_seq_len`. A reply is given room for
  `max_new_tokens`, at most half the window; when the rendered prompt would not leave that
  room, whole exchanges (a user message and its reply) are dropped, oldest first. The
  system message is always kept. The first drop is announced once.
- A reply is kept in the history as its decoded text, re-encoded by the template the next
  turn, as any chat front end does.
- Lines starting with "/" are commands (/reset, /exit, /help); EOF (Ctrl-D) ends the session
  as /exit does; Ctrl-C stops a reply mid-stream and keeps what was said.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from dsfm.data.chat import end_of_turn_id, render_prompt
from dsfm.data.tokenizer import Tokenizer
from dsfm.eval.generate import (
    chat_turn,
    check_args,
    context_cut,
    recorded,
    stream,
    stream_text,
)
from dsfm.interop.weights import load_model
from dsfm.train import checkpoint

PROMPT = ">>> "
HELP = "/reset starts over (the system message stays), /exit or Ctrl-D quits"


def reply_room(max_new_tokens: int, max_seq_len: int) -> int:
    """Tokens kept free for a reply: `max_new_tokens`, at most half the window."""
    return min(max_new_tokens, max_seq_len // 2)


def fit_history(
    system: str | None,
    history: list[dict],
    user: str,
    count: Callable[[list[dict]], int],
    limit: int,
) -> tuple[list[dict], int]:
    """(history, exchanges dropped): the newest exchanges whose prompt `count`s <= `limit`.

    Raises ValueError when the system message and `user` alone do not fit.
    """
    dropped = 0
    while count(chat_turn(system, history, user)) > limit:
        if not history:
            raise ValueError(
                f"this message makes a prompt of {count(chat_turn(system, [], user))} tokens, "
                f"over the {limit} that leave room for a reply; shorten it"
                + (" or the system message" if system else "")
            )
        history = history[2:]  # one exchange: a user message and its reply
        dropped += 1
    return history, dropped


def chat_command(
    checkpoint_path: str,
    system: str | None,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int,
    dtype: str,
    trust_checkpoint: bool = False,
) -> int:
    checkpoint.trust_pickles(trust_checkpoint)
    ckpt_dir, tag = checkpoint.resolve(checkpoint_path)
    tokenizer = Tokenizer.load(ckpt_dir / tag)
    end_id = end_of_turn_id(tokenizer)
    if end_id is None:
        raise ValueError(
            f"{ckpt_dir / tag} is not a chat model (its tokenizer has no chat template or "
            f"chat tokens); fine-tune it on `dsfm prepare --chat` data first, or use "
            f"`dsfm generate`"
        )
    state = checkpoint.client_state(ckpt_dir, tag)
    max_seq_len = state["config"]["model"]["max_seq_len"]
    check_args([tokenizer.eot_id], max_new_tokens, temperature, top_k, top_p, max_seq_len)
    limit = max_seq_len - reply_room(max_new_tokens, max_seq_len)

    def count(messages: list[dict]) -> int:
        return len(render_prompt(messages, tokenizer))

    if system is not None and count(chat_turn(system, [], "")) > limit:
        raise ValueError(
            f"the system message alone is {count(chat_turn(system, [], ''))} tokens, over the "
            f"{limit} of the {max_seq_len}-token context that leave room for a reply"
        )
    model, _ = load_model(ckpt_dir / tag, dtype=dtype)
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())
    print(f"chatting with {ckpt_dir / tag} ({max_seq_len}-token context); {HELP}")

    history: list[dict] = []
    warned = False
    while True:
        try:
            line = input(PROMPT)
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not interactive:
            print(line)  # a transcript reads like the terminal session
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command = text.split()[0]
            if command in ("/exit", "/quit"):
                return 0
            if command == "/reset":
                history = []
                print("(conversation cleared)")
            else:
                print(HELP if command == "/help" else f"unknown command {command}; {HELP}")
            continue
        try:
            history, dropped = fit_history(system, history, text, count, limit)
        except ValueError as e:
            print(f"({e})")
            continue
        if dropped and not warned:
            print(
                f"(the conversation outgrew the {max_seq_len}-token context: the oldest turns "
                f"are dropped from now on" + ("; the system message stays)" if system else ")")
            )
            warned = True
        ids = render_prompt(chat_turn(system, history, text), tokenizer)
        drawn: list[int] = []
        tokens = stream(
            model,
            ids,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            eot_id=end_id,
        )
        reply = ""
        try:
            for piece in stream_text(tokenizer, recorded(tokens, drawn)):
                print(piece, end="", flush=True)
                reply += piece
        except KeyboardInterrupt:
            print(" (stopped)", end="")
        print()
        if cut := context_cut(len(ids), len(drawn), max_new_tokens, max_seq_len):
            print(f"({cut})")
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
