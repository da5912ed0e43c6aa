"""The chat template of instruction data and its loss mask (`dsfm prepare --chat`, generation).

Design choices:
- Template "dsfm-v2". Each message renders as `ROLE + "\\n" + content + END + "\\n"` and a
  conversation ends with EOT:

      <|system|>\\nBe brief.<|end|>\\n<|user|>\\nHi<|end|>\\n<|assistant|>\\nHello!<|end|>\\n
      <|endoftext|>

  (one string, wrapped here). A generation prompt is the history followed by
  `<|assistant|>\\n` (`render_prompt`); sampling stops at END.
- The loss mask is 1 on the tokens the model must learn to produce: assistant content and
  the END that closes it. Everything else is 0: role tokens, the "\\n" after them, system
  and user content, the "\\n" after END, and the final EOT. Generation stops at END, so
  what follows it (the "\\n", the next role token, EOT) is template written by whoever
  drives the conversation, never something the model has to choose.
- `mask[t]` marks token `t` as a target. With the usual shift (`labels[t] = tokens[t+1]`)
  position `t` is trained when `mask[t+1]` is 1; `dataset.masked_labels` does that shift.
- Ids are built per piece: role tokens and END by id, the text between two of them
  ("\\n" + content) through `Tokenizer.encode`, which never produces a special id (a user
  who types "<|assistant|>" gets its bytes), so user text cannot forge a turn. A Hugging
  Face tokenizer splits a rendered template at its special tokens and encodes the same
  pieces, so the ids equal `apply_chat_template`'s (v1 encoded "\\n" and content apart,
  which differs where BPE merges them). The mask boundary is after the tokens of "\\n"
  alone; a token that merges it with the content's start counts as content.
- Chat tokens are special tokens appended after the existing vocabulary, so every
  pretrained id keeps its meaning; a model fine-tuned on the data is built at its
  vocabulary, the new rows starting at the mean of the old (`interop.weights.TensorSource`).
- A chat dataset is the pretraining format plus `{split}.mask`, one uint8 per token
  (`format.py`); `prepare.prepare_chat` writes it, rendering each conversation here.
- A tokenizer whose config has its own `chat_template` (an imported instruct model) is
  rendered with that template instead (`model_template.py`), so the fine-tuned model
  keeps speaking the format it was trained on; `render`, `render_prompt` and `prompt_ids`
  choose by the tokenizer. dsfm's template goes out as Jinja too (`jinja_template`), so an
  exported model's `apply_chat_template` gives the ids it was trained on.
- A family that starts texts with BOS (`Tokenizer.add_bos`) gets it before a conversation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import tokenizers

from dsfm.data import model_template
from dsfm.data.tokenizer import Tokenizer

SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
CHAT_TOKENS = (SYSTEM, USER, ASSISTANT, END)
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
CHAT_TEMPLATE = "dsfm-v2"


# ---------------------------------------------------------------------------------------
# Tokens


def add_chat_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """A copy of `tokenizer` with the chat tokens as special tokens, appended after its ids.

    Idempotent: tokens already present as special tokens keep their ids. The input
    tokenizer is left untouched.
    """
    hf = tokenizers.Tokenizer.from_str(tokenizer.hf_tokenizer.to_str())
    special = {t.content for t in hf.get_added_tokens_decoder().values() if t.special}
    for token in CHAT_TOKENS:
        if hf.token_to_id(token) is not None and token not in special:
            # Marking an ordinary vocabulary entry special would change what old ids mean.
            raise ValueError(
                f"{token!r} is an ordinary token of this tokenizer, not a special one; "
                f"the chat template needs it reserved, so use a tokenizer without it"
            )
    missing = [t for t in CHAT_TOKENS if t not in special]
    n_before = hf.get_vocab_size(with_added_tokens=True)
    hf.add_special_tokens(missing)
    ids = [hf.token_to_id(t) for t in missing]
    if ids != list(range(n_before, n_before + len(missing))):
        raise ValueError(
            f"chat tokens got ids {ids}, not the next free ids from {n_before}: the tokenizer's "
            f"vocabulary has gaps, so the model's embedding could not simply grow to fit"
        )
    return Tokenizer(hf, tokenizer.config)


def chat_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """Id of each chat token; an error if `add_chat_tokens` has not been applied."""
    ids = {t: tokenizer.hf_tokenizer.token_to_id(t) for t in CHAT_TOKENS}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"tokenizer has no {missing} tokens; pass it through add_chat_tokens")
    return ids


@dataclass(frozen=True)
class Template:
    """The fixed ids of the template for one tokenizer."""

    role_ids: dict[str, int]
    end_id: int
    newline: list[int]
    eot_id: int
    bos: list[int]

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> Template:
        ids = chat_token_ids(tokenizer)
        role_ids = {role: ids[token] for role, token in ROLE_TOKENS.items()}
        bos = [tokenizer.bos_id] if tokenizer.add_bos else []
        return cls(role_ids, ids[END], tokenizer.encode("\n"), tokenizer.eot_id, bos)


def jinja_template(tokenizer: Tokenizer) -> str:
    """dsfm's template as the Jinja `chat_template` of a Hugging Face tokenizer config: it
    renders the text whose tokens are `render` / `render_prompt`'s ids."""
    role_check = " or ".join(f"message['role'] == '{role}'" for role in ROLE_TOKENS)
    bos = "{{ bos_token }}" if tokenizer.add_bos else ""
    return (
        bos + "{% for message in messages %}"
        f"{{% if not ({role_check}) %}}"
        "{{ raise_exception('dsfm-v2 has no role ' + message['role']) }}{% endif %}"
        f"{{{{ '<|' + message['role'] + '|>\\n' + message['content'] + '{END}\\n' }}}}"
        "{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ '{ASSISTANT}\\n' }}}}"
        f"{{% else %}}{{{{ '{tokenizer.token(tokenizer.eot_id)}' }}}}{{% endif %}}"
    )


def end_of_turn_id(tokenizer: Tokenizer) -> int | None:
    """The token that closes an assistant turn: dsfm's END, the model template's own, or
    None for a tokenizer that is not a chat tokenizer."""
    if tokenizer.chat_template:
        return model_template.end_of_turn_id(tokenizer)
    return tokenizer.hf_tokenizer.token_to_id(END)


# ---------------------------------------------------------------------------------------
# Conversations


def check_messages(messages: object, *, require_assistant: bool = True) -> list[dict]:
    """Validate a message list; return it. Errors say which message is wrong and how."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {role, content} objects")
    for i, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} is a {type(message).__name__}, not an object")
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"message {i} has no {key!r} key (found {sorted(message)})")
        if message["role"] not in ROLE_TOKENS:
            raise ValueError(
                f"message {i} has unknown role {message['role']!r}; "
                f"valid roles: {', '.join(sorted(ROLE_TOKENS))}"
            )
        content = message["content"]
        if not isinstance(content, str):
            raise ValueError(f"message {i}'s content is a {type(content).__name__}, not a string")
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise ValueError("conversation has no assistant turn, so nothing to learn from it")
    return messages


def parse_record(record: object) -> list[dict]:
    """Messages of one JSONL record: `{"messages": [...]}` or `{"prompt", "response"}`."""
    if not isinstance(record, dict):
        raise ValueError(f"record is a {type(record).__name__}, not a JSON object")
    has_pair = "prompt" in record or "response" in record
    if "messages" in record:
        if has_pair:
            raise ValueError("record has both 'messages' and 'prompt'/'response'; use one form")
        return check_messages(record["messages"])
    if has_pair:
        for key in ("prompt", "response"):
            if key not in record:
                raise ValueError(f"record has no {key!r} key (found {sorted(record)})")
            if not isinstance(record[key], str):
                raise ValueError(f"{key!r} is a {type(record[key]).__name__}, not a string")
        messages = [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["response"]},
        ]
        return check_messages(messages)
    raise ValueError(
        f"record has neither 'messages' nor 'prompt'/'response' (found {sorted(record)})"
    )


def assemble(
    roles: Sequence[str], contents: Sequence[list[int]], template: Template
) -> tuple[list[int], list[int]]:
    """Token ids and loss mask from each message's role and encoded "\\n" + content
    (`encode_contents`)."""
    ids: list[int] = list(template.bos)
    mask: list[int] = [0] * len(ids)
    for role, content in zip(roles, contents, strict=True):
        learn = int(role == "assistant")
        nl = template.newline
        head = 1 + (len(nl) if content[: len(nl)] == nl else 0)  # role token and its "\n"
        ids += [template.role_ids[role], *content, template.end_id, *nl]
        mask += [0] * head + [learn] * (len(content) + 2 - head) + [0] * len(nl)
    ids.append(template.eot_id)
    mask.append(0)
    return ids, mask


def encode_contents(tokenizer: Tokenizer, contents: list[str]) -> list[list[int]]:
    """Each message's text piece: the "\\n" after its role token, then its content."""
    return tokenizer.encode_batch(["\n" + c for c in contents])


def render(messages: Sequence[dict], tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of a conversation (EOT-terminated) and its 0/1 loss mask, same length."""
    check_messages(messages)
    if tokenizer.chat_template:
        return model_template.render(messages, tokenizer)
    contents = encode_contents(tokenizer, [m["content"] for m in messages])
    return assemble([m["role"] for m in messages], contents, Template.of(tokenizer))


def prompt_ids(tokenizer: Tokenizer, text: str, *, chat: bool) -> tuple[list[int], int]:
    """(prompt ids, stop id) for sampling: a user turn of a chat model, stopping at END, or
    plain text continued until EOT."""
    if chat:
        return render_prompt([{"role": "user", "content": text}], tokenizer), end_of_turn_id(
            tokenizer
        )
    return tokenizer.encode(text) or [tokenizer.eot_id], tokenizer.eot_id


def render_prompt(messages: Sequence[dict], tokenizer: Tokenizer) -> list[int]:
    """Ids to generate the next assistant turn from: the history, then `<|assistant|>\\n`.

    Sample until END; the reply is the tokens before it. With the model's own template:
    its generation prompt, sampled until its end of turn.
    """
    if tokenizer.chat_template:
        if messages:
            check_messages(list(messages), require_assistant=False)
        return model_template.render_prompt(messages, tokenizer)
    template = Template.of(tokenizer)
    ids: list[int] = []
    if messages:
        check_messages(list(messages), require_assistant=False)
        contents = encode_contents(tokenizer, [m["content"] for m in messages])
        ids, _ = assemble([m["role"] for m in messages], contents, template)
        ids.pop()  # the conversation goes on, so no EOT
    else:
        ids = list(template.bos)
    return ids + [template.role_ids["assistant"], *template.newline]
