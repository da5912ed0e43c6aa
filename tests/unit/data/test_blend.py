"""Blends (data.mix): proportions in every window, per-source epochs, elastic order, config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dsfm.config.resolve import load_resolved
from dsfm.config.schema import ConfigError
from dsfm.data.blend import PERIOD, Blend, BlendedDataset, open_split, quotas
from dsfm.data.dataset import TokenDataset
from dsfm.data.prepare import prepare
from dsfm.data.sampler import Sampler, shuffled

WEIGHTS = {
    "two": [0.7, 0.3],
    "three_odd": [0.55, 0.3333, 0.1167],
    "unnormalised": [5.0, 3.0, 1.0],
}


@pytest.mark.parametrize("weights", WEIGHTS.values(), ids=WEIGHTS.keys())
@pytest.mark.parametrize("global_batch", [4, 7])
def test_any_1000_batches_have_the_weights_within_2_percent(weights, global_batch):
    blend = Blend([10**9, 123, 4099][: len(weights)], weights, seed=1)
    target = np.asarray(weights) / sum(weights)
    window = 1000 * global_batch
    for first_batch in [0, 1, 9_361, PERIOD // global_batch - 500, 10**11 + 3]:
        start = first_batch * global_batch
        source, _ = blend.locate(np.arange(start, start + window))
        realised = np.bincount(source, minlength=len(weights)) / window
        np.testing.assert_allclose(realised, target, rtol=0.02, err_msg=f"batch {first_batch}")


def test_quotas_fill_the_period_and_keep_tiny_weights():
    q = quotas([0.7, 0.3])
    assert q.sum() == PERIOD and abs(q[0] / PERIOD - 0.7) <= 1 / PERIOD
    tiny = quotas([1.0, 1e-9])
    assert tiny.sum() == PERIOD and tiny[1] == 1  # a positive weight is never dropped
    for bad in ([], [1.0, 0.0], [1.0, -2.0], [float("nan")]):
        with pytest.raises(ValueError, match="weights"):
            quotas(bad)


def test_each_source_repeats_reshuffled_epochs_and_counts_them():
    sizes = [5, 13, 101]
    blend = Blend(sizes, [0.5, 0.3, 0.2], seed=9)
    n_positions = 2 * PERIOD + 77  # crosses the pattern's period twice
    source, sample = blend.locate(np.arange(n_positions))
    for k, size in enumerate(sizes):
        taken = sample[source == k]
        n_epochs = len(taken) // size
        assert n_epochs >= 2
        epochs = taken[: n_epochs * size].reshape(n_epochs, size)
        for e in sorted({0, 1, n_epochs - 1}):  # every epoch of the source is a permutation
            assert sorted(epochs[e].tolist()) == list(range(size))
            expected = shuffled(np.arange(e * size, (e + 1) * size), size, 9, stream=k)
            np.testing.assert_array_equal(epochs[e], expected)
        assert not all(np.array_equal(epochs[0], row) for row in epochs[1:4])
    for consumed in [0, 1, 999, PERIOD, PERIOD + 1, n_positions]:
        counts = np.bincount(source[:consumed], minlength=3)
        np.testing.assert_array_equal(blend.consumed(consumed), counts)
        np.testing.assert_allclose(blend.epochs(consumed), counts / sizes)


def test_one_source_blend_is_the_plain_sampler_order():
    n = 1009
    positions = np.arange(5 * n - 17, 5 * n + 300)
    _, sample = Blend([n], [1.0], seed=3).locate(positions)
    np.testing.assert_array_equal(
        sample, Sampler(n, 1, seed=3).indices_at(int(positions[0]), len(positions))
    )


def test_blend_seed_changes_order_but_not_sources():
    a = Blend([1000, 1000], [0.6, 0.4], seed=1).locate(np.arange(5000))
    b = Blend([1000, 1000], [0.6, 0.4], seed=2).locate(np.arange(5000))
    np.testing.assert_array_equal(a[0], b[0])
    assert (a[1] == b[1]).mean() < 0.05


@pytest.mark.parametrize("consumed", [0, 3, PERIOD - 5, 10**12 + 1])
def test_any_world_size_sees_the_same_blended_batch(consumed):
    blend = Blend([7, 10**6, 31], [0.2, 0.5, 0.3], seed=5)
    batches = {}
    for world in (1, 2, 4):
        ranks = [
            Sampler(10**6 + 38, 8, r, world, seed=5, consumed_samples=consumed, shuffle=False)
            for r in range(world)
        ]
        steps = [np.concatenate([s.next_indices() for s in ranks]) for _ in range(4)]
        batches[world] = np.stack([np.stack(blend.locate(step)) for step in steps])
    np.testing.assert_array_equal(batches[1], batches[2])
    np.testing.assert_array_equal(batches[1], batches[4])


# ---------------------------------------------------------------- real datasets


def make(tmp_path: Path, name: str, docs: list[str], val_fraction: float = 0.3) -> Path:
    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / name
    prepare([str(src)], out, tokenizer="byte", val_fraction=val_fraction, progress=False)
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("blend")
    return {
        "a": make(tmp, "a", [f"alpha {i} " * 20 for i in range(40)]),
        "b": make(tmp, "b", [f"BETA {i} " * 9 for i in range(30)]),
        "noval": make(tmp, "noval", [f"gamma {i} " * 9 for i in range(30)], val_fraction=0),
    }


def test_blended_dataset_reads_each_sources_samples(sources):
    a, b = TokenDataset(sources["a"], "train", 16), TokenDataset(sources["b"], "train", 16)
    data = BlendedDataset([a, b], [0.7, 0.3], ["a", "b"], seed=4)
    assert len(data) == len(a) + len(b)
    assert (data.vocab_size, data.eot_id, data.seq_len) == (257, 256, 16)
    positions = np.arange(len(data) - 5, len(data) + 20)  # past the nominal length is fine
    x, y = data.inputs_and_labels(positions)
    assert x.shape == y.shape == (25, 16)
    source, sample = data.blend.locate(positions)
    for row, k, i in zip(range(25), source, sample):
        expected = (a, b)[k][int(i)]
        np.testing.assert_array_equal(x[row].numpy(), expected[:-1])
        np.testing.assert_array_equal(y[row].numpy(), expected[1:])
        np.testing.assert_array_equal(data[int(positions[row])], expected)
    np.testing.assert_array_equal(data.batch(positions)[:, :-1].numpy(), x.numpy())
    by_source = data.by_source(positions)
    np.testing.assert_array_equal(by_source[1], sample[source == 1])
    assert set(data.epochs(len(data))) == {"a", "b"}


def test_val_blend_is_fixed_and_skips_sources_without_val(sources):
    spec = [("a", str(sources["a"]), 0.7), ("noval", str(sources["noval"]), 0.3)]
    warnings: list[str] = []
    val = open_split(spec, "val", 16, seed=None, warn=warnings.append)
    assert val.names == ["a"] and "'noval' left out" in warnings[0]
    a_val = TokenDataset(sources["a"], "val", 16)
    np.testing.assert_array_equal(val.by_source(range(len(a_val)))[0], np.arange(len(a_val)))
    with pytest.raises(ValueError, match="'noval'.*val"):
        open_split(spec, "val", 16, seed=None)


# ---------------------------------------------------------------- config


def problems(*overrides: str) -> str:
    with pytest.raises(ConfigError) as e:
        load_resolved(None, list(overrides))
    return str(e.value)


def test_mix_config_parses_and_fills_vocab(sources):
    cfg = load_resolved(
        None,
        [
            f"data.mix=[{{path: {sources['a']}, weight: 0.7}}, "
            f"{{path: {sources['b']}, weight: 0.3, name: bee}}]"
        ],
    )
    assert cfg.data.sources() == [("a", str(sources["a"]), 0.7), ("bee", str(sources["b"]), 0.3)]
    assert cfg.model.vocab_size == 257


def test_mix_config_errors_come_together(sources, tmp_path):
    a, b = sources["a"], sources["b"]
    other_tok = tmp_path / "other"
    shutil.copytree(b, other_tok)
    tok = json.loads((other_tok / "tokenizer.json").read_text())
    tok["added_tokens"][0]["content"] = "<|other|>"  # same ids, different tokenizer
    (other_tok / "tokenizer.json").write_text(json.dumps(tok))
    text = problems(
        f"data.path={a}",
        f"data.mix=[{{path: {a}}}, {{path: {b}, weight: 0}}]",
    )
    assert "data.path and data.mix are both set" in text
    text = problems(
        f"data.mix=[{{path: {a}, weight: 0}}, {{path: {tmp_path}/missing}}, "
        f"{{path: {other_tok}, weight: 2}}, {{path: {a}, weight: 1}}]",
        "train.max_steps=0",
    )
    assert "source 'a'" in text and "weight must be > 0, got 0.0" in text
    assert "source 'missing'" in text and "no meta.json there" in text
    assert "'a' and 'other' were prepared with different tokenizers" in text
    assert "tokenizer.json differs" in text
    assert "two sources are named 'a'" in text
    assert "train.max_steps must be >= 1" in text  # one error lists everything
    assert "did you mean 'weight'" in problems(f"data.mix=[{{path: {a}, wieght: 1}}]")
    assert "vocab_size" in problems(f"data.mix=[{{path: {a}}}]", "model.vocab_size=100")
