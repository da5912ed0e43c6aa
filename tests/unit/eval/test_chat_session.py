"""The context window of `dsfm chat`: which turns a prompt keeps."""

from __future__ import annotations

import pytest

from dsfm.eval.chat import fit_history, reply_room


def words(messages: list[dict]) -> int:
    """A stand-in token count: words of every message, plus one per message."""
    return sum(len(m["content"].split()) + 1 for m in messages)


def exchange(n: int) -> list[dict]:
    return [
        {"role": "user", "content": f"question {n}"},
        {"role": "assistant", "content": f"answer {n}"},
    ]


def test_oldest_exchanges_dropped_system_kept():
    history = exchange(1) + exchange(2) + exchange(3)
    # system 4 + 3 exchanges of 6 + the new message 3 = 25
    assert fit_history("be very brief", history, "next one", words, 25) == (history, 0)
    kept, dropped = fit_history("be very brief", history, "next one", words, 24)
    assert (kept, dropped) == (exchange(2) + exchange(3), 1)
    kept, dropped = fit_history("be very brief", history, "next one", words, 7)
    assert (kept, dropped) == ([], 3)
    kept, dropped = fit_history(None, history, "next one", words, 9)
    assert (kept, dropped) == (exchange(3), 2)


def test_a_message_that_cannot_fit_is_refused():
    with pytest.raises(ValueError, match="prompt of 8 tokens, over the 6 .* system message"):
        fit_history("be very brief", exchange(1), "a b c", words, 6)


def test_reply_room_is_max_new_tokens_at_most_half_the_window():
    assert reply_room(200, 2048) == 200
    assert reply_room(200, 64) == 32
