"""Unit tests for dsfm.generate.sample on a tiny random-init model."""

from __future__ import annotations

import pytest
import torch

from dsfm.eval.generate import context_cut, sample
from dsfm.model.config import ModelConfig
from dsfm.model.gpt import GPT

VOCAB = 64
PROMPT = [1, 5, 9, 2]


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=VOCAB,
        n_layers=2,
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=96,
        max_seq_len=64,
    )
    m = GPT(cfg)
    # Larger weights than init give peaked, position-dependent distributions, so greedy and
    # sampled paths actually move around the vocabulary.
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    return m


def test_deterministic_for_a_seed_and_seeds_differ(model):
    a = sample(model, PROMPT, max_new_tokens=20, seed=123)
    b = sample(model, PROMPT, max_new_tokens=20, seed=123)
    c = sample(model, PROMPT, max_new_tokens=20, seed=124)
    assert len(a) == 20 and all(0 <= t < VOCAB for t in a)
    assert a == b
    assert a != c


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0.0},
        {"temperature": 1.0, "seed": 7},
        {"temperature": 0.8, "top_k": 10, "seed": 8},
        {"temperature": 1.2, "top_p": 0.9, "seed": 9},
    ],
)
def test_cached_equals_uncached(model, kwargs):
    cached = sample(model, PROMPT, max_new_tokens=30, use_cache=True, **kwargs)
    uncached = sample(model, PROMPT, max_new_tokens=30, use_cache=False, **kwargs)
    assert len(cached) == 30
    assert cached == uncached


def test_greedy_ignores_seed_and_top_k_1_is_greedy(model):
    greedy = sample(model, PROMPT, max_new_tokens=15, temperature=0.0)
    assert greedy == sample(model, PROMPT, max_new_tokens=15, temperature=0.0, seed=5)
    assert greedy == sample(model, PROMPT, max_new_tokens=15, temperature=1.0, top_k=1, seed=5)
    assert len(set(greedy)) > 1  # the path is not a trivial repeat of one token


def test_stops_at_eot(model):
    free = sample(model, PROMPT, max_new_tokens=20, seed=3)
    eot = free[5]
    first = free.index(eot)
    out = sample(model, PROMPT, max_new_tokens=20, seed=3, eot_id=eot)
    assert out == free[:first]
    assert eot not in out


def test_global_rng_untouched(model):
    torch.manual_seed(42)
    state = torch.get_rng_state()
    sample(model, PROMPT, max_new_tokens=10, seed=1)
    sample(model, PROMPT, max_new_tokens=10)  # seed=None must not draw from the global RNG
    assert torch.equal(torch.get_rng_state(), state)


def test_restores_training_mode(model):
    model.train()
    sample(model, PROMPT, max_new_tokens=3, seed=0)
    assert model.training
    model.eval()
    sample(model, PROMPT, max_new_tokens=3, seed=0)
    assert not model.training


@pytest.mark.parametrize("use_cache", [True, False])
def test_capped_at_max_seq_len(model, use_cache):
    prompt = list(range(60))
    out = sample(model, prompt, max_new_tokens=10, seed=0, use_cache=use_cache)
    assert len(out) == 4
    assert sample(model, list(range(64)), max_new_tokens=5, use_cache=use_cache) == []
    assert sample(model, PROMPT, max_new_tokens=0) == []


def test_context_cut_is_said_only_when_the_context_stopped_it(model):
    out = sample(model, list(range(60)), max_new_tokens=10, seed=0)
    note = context_cut(60, len(out), 10, 64)
    assert note == (
        "generation stopped at the model's 64-token context: 4 of the 10 new tokens asked "
        "for, after a 60-token prompt"
    )
    assert context_cut(60, 4, 4, 64) is None  # asked for no more than fits
    assert context_cut(60, 2, 10, 64) is None  # stopped earlier (EOT), not by the context
    assert context_cut(4, 10, 10, 64) is None


def test_top_p_restricts_to_nucleus(model):
    # A tiny nucleus keeps only the most likely token: identical to greedy.
    greedy = sample(model, PROMPT, max_new_tokens=10, temperature=0.0)
    assert sample(model, PROMPT, max_new_tokens=10, top_p=1e-6, seed=1) == greedy


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
    ],
)
def test_bad_arguments_refused(model, kwargs, match):
    kwargs = {"max_new_tokens": 5, **kwargs}
    with pytest.raises(ValueError, match=match):
        sample(model, PROMPT, **kwargs)


def test_empty_or_too_long_prompt_refused(model):
    with pytest.raises(ValueError, match="empty"):
        sample(model, [], max_new_tokens=5)
    with pytest.raises(ValueError, match="max_seq_len"):
        sample(model, list(range(65)), max_new_tokens=5)
    with pytest.raises(ValueError, match="token ids"):
        sample(model, [VOCAB], max_new_tokens=5)


def test_stream_yields_what_sample_returns_and_restores_mode_when_closed_early(model):
    from dsfm.eval.generate import stream

    kwargs = dict(max_new_tokens=20, temperature=0.9, top_k=20, seed=5)
    assert list(stream(model, PROMPT, **kwargs)) == sample(model, PROMPT, **kwargs)
    model.train()
    tokens = stream(model, PROMPT, **kwargs)
    next(tokens)
    assert not model.training  # sampling runs in eval mode
    tokens.close()  # the reader stopped early (Ctrl-C, a stop string)
    assert model.training
    model.eval()
    with pytest.raises(ValueError, match="temperature"):
        stream(model, PROMPT, max_new_tokens=4, temperature=-1)  # at the call, not on next()


def test_stream_text_joins_to_the_decoded_text_and_never_shows_half_a_character():
    from dsfm.data.tokenizer import byte_tokenizer
    from dsfm.eval.generate import stream_text

    tok = byte_tokenizer()
    ids = tok.encode("añb東京 done")  # multi-byte characters: one token per byte
    pieces = list(stream_text(tok, ids))
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
    assert "東" in pieces  # shown once its third byte arrived
    broken = ids[:4]  # "añ" and the first byte of "b"... cut inside no character
    assert "".join(stream_text(tok, broken)) == tok.decode(broken)
    cut = tok.encode("東")[:2]  # a reply cut mid-character still ends with its text
    assert "".join(stream_text(tok, cut)) == tok.decode(cut)
