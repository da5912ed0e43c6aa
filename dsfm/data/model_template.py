"""A model's own chat template (Jinja, from its tokenizer config), rendered as transformers
renders it, with an exact assistant-only loss mask.

Design choices:
- Rendering is transformers' `apply_chat_template`: the same Jinja environment (sandboxed,
  `trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception`, `strftime_now`, a
  `tojson` that keeps unicode, `{% generation %}` blocks rendered as their body), the same
  variables (`messages`, `add_generation_prompt`, the special tokens as strings), and the
  whole text tokenized with special tokens parsed and none added. So the ids are the ones
  a transformers user gets for the same conversation.
- The loss mask comes from prefix differences: assistant message i is the text between the
  rendering of messages[:i] with a generation prompt and that of messages[:i+1]. It is cut
  after the first special token that follows the content (the end of turn): what a
  template writes after it ("\\n" in ChatML) is the driver's, not the model's to learn. A
  template that does not render a conversation as the extension of its prefixes is refused,
  since no exact mask exists for it.
- Text is tokenized whole (so ids equal transformers'), and a boundary is placed where the
  tokens of the text before it stop agreeing with the whole: with specials and newlines at
  every boundary of the common templates that is exact; a token that straddles one (BPE
  merging a template "\\n" with content that starts with "\\n") counts as assistant.
- A conversation ends with the tokenizer's document separator (mask 0; added unless the
  template writes it, as dsfm's own does), which must differ
  from the end of turn: document masking restarts attention after every separator and
  would otherwise cut a conversation into turns.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache

from dsfm.data.tokenizer import Tokenizer, token_content

PROBE = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]


@lru_cache(maxsize=8)
def _compile(source: str):
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' mask markers): the body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message: str):
        from jinja2.exceptions import TemplateError

        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def render_text(
    messages: Sequence[dict], tokenizer: Tokenizer, *, add_generation_prompt: bool
) -> str:
    """The template's text for `messages`, as transformers renders it."""
    tokens = {
        key: token_content(value)
        for key, value in tokenizer.config.items()
        if key.endswith("_token") and token_content(value) is not None
    }
    extra = tokenizer.config.get("additional_special_tokens") or []
    return _compile(tokenizer.chat_template).render(
        messages=list(messages),
        add_generation_prompt=add_generation_prompt,
        additional_special_tokens=[token_content(t) for t in extra],
        **tokens,
    )


def _turn_end(turn: str, content: str, specials: list[str]) -> int:
    """Where an assistant turn's text ends: after the first special token that follows its
    content (the end of turn), else at the end of the text."""
    start = turn.find(content.strip()) if content.strip() else -1
    start = start + len(content.strip()) if start >= 0 else 0
    found = [(turn.find(s, start), s) for s in specials if turn.find(s, start) >= 0]
    if not found:
        return len(turn)
    at, token = min(found, key=lambda f: (f[0], -len(f[1])))
    return at + len(token)


def _boundary(tokenizer: Tokenizer, text: str, at: int, ids: list[int]) -> int:
    """The index in `ids` (the tokens of all of `text`) where character `at` falls."""
    head = tokenizer.encode_parsing_specials(text[:at])
    n = 0
    while n < min(len(head), len(ids)) and head[n] == ids[n]:
        n += 1
    return n


def render(messages: Sequence[dict], tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of a conversation (separator-terminated) and its 0/1 loss mask."""
    full = render_text(messages, tokenizer, add_generation_prompt=False)
    ids = tokenizer.encode_parsing_specials(full)
    mask = [0] * len(ids)
    specials = tokenizer.special_tokens()
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_text(messages[:i], tokenizer, add_generation_prompt=True)
        through = render_text(messages[: i + 1], tokenizer, add_generation_prompt=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise ValueError(
                f"the model's chat template does not render message {i + 1} as an extension "
                "of the messages before it (it rewrites earlier turns), so the assistant-only "
                "loss mask cannot be exact; use a tokenizer without a chat_template to train "
                "with dsfm's template"
            )
        end = len(before) + _turn_end(through[len(before) :], message["content"], specials)
        start_id = _boundary(tokenizer, full, len(before), ids)
        end_id = _boundary(tokenizer, full, end, ids)
        mask[start_id:end_id] = [1] * (end_id - start_id)
    if ids and ids[-1] == tokenizer.eot_id:  # the template ends conversations itself
        return ids, mask
    return ids + [tokenizer.eot_id], mask + [0]


def render_prompt(messages: Sequence[dict], tokenizer: Tokenizer) -> list[int]:
    """Ids to generate the next assistant turn from (the template's generation prompt)."""
    text = render_text(messages, tokenizer, add_generation_prompt=True)
    return tokenizer.encode_parsing_specials(text)


def end_of_turn_id(tokenizer: Tokenizer) -> int | None:
    """The special token that closes an assistant turn, None if the template has none."""
    before = render_text(PROBE[:1], tokenizer, add_generation_prompt=True)
    through = render_text(PROBE, tokenizer, add_generation_prompt=False)
    turn = through[len(before) :]
    end = _turn_end(turn, PROBE[1]["content"], tokenizer.special_tokens())
    ids = tokenizer.encode_parsing_specials(turn[:end])
    special_ids = {tokenizer.hf_tokenizer.token_to_id(t) for t in tokenizer.special_tokens()}
    return ids[-1] if ids and ids[-1] in special_ids else None


def check_template(tokenizer: Tokenizer) -> int:
    """The end-of-turn id; an error when conversations could not be packed with it."""
    end = end_of_turn_id(tokenizer)
    if end is None:
        raise ValueError(
            "the model's chat template ends an assistant turn with no special token, so "
            "generation could not stop at it; use a tokenizer without a chat_template to "
            "train with dsfm's template"
        )
    if end == tokenizer.eot_id:
        raise ValueError(
            f"the model's chat template ends turns with {tokenizer.token(end)!r}, which is also "
            "its end-of-text token: conversations packed together could not be told apart "
            "from turns (document masking would cut them); use a tokenizer without a "
            "chat_template to train with dsfm's template"
        )
    return end
