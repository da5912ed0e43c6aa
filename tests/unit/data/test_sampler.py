"""Sampler: one seeded global order, sharded by rank, resumable from consumed_samples alone."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from dsfm.data.sampler import Sampler, permute, shuffled

N = 103  # not a multiple of any batch size below, so batches straddle epochs


def take(sampler: Sampler, steps: int) -> list[np.ndarray]:
    return [sampler.next_indices() for _ in range(steps)]


def global_batches(world_size: int, steps: int, **kwargs) -> list[np.ndarray]:
    """Each step's global batch, assembled from every rank's slice in rank order."""
    ranks = [Sampler(N, rank=r, world_size=world_size, **kwargs) for r in range(world_size)]
    return [np.concatenate([s.next_indices() for s in ranks]) for _ in range(steps)]


def test_deterministic_for_a_seed():
    a = take(Sampler(N, 8, seed=3), 30)
    b = take(Sampler(N, 8, seed=3), 30)
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    assert all(x.dtype == np.int64 and x.shape == (8,) for x in a)


def test_different_seeds_differ():
    assert not np.array_equal(take(Sampler(N, 8, seed=0), 1)[0], take(Sampler(N, 8, seed=1), 1)[0])


def test_each_epoch_visits_every_sample_once():
    sampler = Sampler(N, global_batch_size=1, seed=5)
    for epoch in range(3):
        assert sampler.epoch == epoch
        order = np.concatenate(take(sampler, N))
        assert sorted(order.tolist()) == list(range(N))
    epochs = np.concatenate(take(Sampler(N, 1, seed=5), 2 * N)).reshape(2, N)
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch


def test_batches_cross_epoch_boundaries():
    flat = np.concatenate(take(Sampler(N, 10, seed=2), 31)).reshape(-1)  # 310 = 3 epochs + 1
    for epoch in range(3):
        assert sorted(flat[epoch * N : (epoch + 1) * N].tolist()) == list(range(N))
    big = take(Sampler(N, 4 * N, seed=2), 1)[0]  # one batch spanning four epochs
    np.testing.assert_array_equal(big[: len(flat)], flat)
    assert sorted(big[3 * N :].tolist()) == list(range(N))


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_slices_make_up_the_single_rank_batch(world_size):
    single = global_batches(1, 40, global_batch_size=8, seed=9)
    sharded = global_batches(world_size, 40, global_batch_size=8, seed=9)
    np.testing.assert_array_equal(np.stack(single), np.stack(sharded))
    ranks = [Sampler(N, 8, rank=r, world_size=world_size, seed=9) for r in range(world_size)]
    first = [s.next_indices() for s in ranks]
    assert all(len(f) == 8 // world_size for f in first)
    assert len(set(np.concatenate(first).tolist())) == 8  # ranks never share a sample


def test_resume_continues_uninterrupted_order():
    uninterrupted = take(Sampler(N, 6, seed=4), 50)
    first = Sampler(N, 6, seed=4)
    take(first, 17)
    state = first.state_dict()
    assert state == {"consumed_samples": 17 * 6}
    resumed = Sampler(N, 6, seed=4)
    resumed.load_state_dict(state)
    np.testing.assert_array_equal(np.stack(take(resumed, 33)), np.stack(uninterrupted[17:]))
    by_arg = Sampler(N, 6, seed=4, consumed_samples=17 * 6)
    assert by_arg.epoch == (17 * 6) // N
    np.testing.assert_array_equal(np.stack(take(by_arg, 33)), np.stack(uninterrupted[17:]))


def test_resume_on_a_different_world_size():
    uninterrupted = global_batches(1, 40, global_batch_size=8, seed=6)
    ranks = [Sampler(N, 8, rank=r, world_size=2, seed=6) for r in range(2)]
    for _ in range(15):
        for s in ranks:
            s.next_indices()
    states = [s.state_dict() for s in ranks]
    assert states[0] == states[1]
    resumed = global_batches(1, 25, global_batch_size=8, seed=6, **states[0])
    np.testing.assert_array_equal(np.stack(resumed), np.stack(uninterrupted[15:]))


def test_global_batch_size_change_keeps_position():
    flat = np.concatenate(take(Sampler(N, 1, seed=8), 60))
    ramped = Sampler(N, 4, seed=8)
    head = np.concatenate(take(ramped, 5))
    ramped = Sampler(N, 8, seed=8, **ramped.state_dict())
    np.testing.assert_array_equal(np.concatenate([head, *take(ramped, 5)]), flat)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"global_batch_size": 6, "world_size": 4},
        {"global_batch_size": 8, "world_size": 2, "rank": 2},
        {"global_batch_size": 0},
        {"global_batch_size": 8, "consumed_samples": -1},
    ],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        Sampler(N, **kwargs)
    with pytest.raises(ValueError, match="num_samples"):
        Sampler(0, 8)


# ---------------------------------------------------------------- the O(1) permutation


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 65, 1000, 4099, 65537])
def test_permute_is_a_bijection_for_any_n(n):
    for seed, epoch, stream in [(0, 0, 0), (3, 1, 0), (3, 0, 2), (2**40 + 1, 7, 5)]:
        perm = permute(np.arange(n), n, seed, epoch, stream)
        assert perm.dtype == np.int64
        assert sorted(perm.tolist()) == list(range(n)), (n, seed, epoch, stream)


def test_permute_is_deterministic_and_keyed():
    n = 1000
    base = permute(np.arange(n), n, seed=4, epochs=2, stream=1)
    np.testing.assert_array_equal(base, permute(np.arange(n), n, seed=4, epochs=2, stream=1))
    # Any single part of the key gives another order: at most a few coincident positions.
    for other in [(5, 2, 1), (4, 3, 1), (4, 2, 0)]:
        assert (permute(np.arange(n), n, *other) == base).sum() < 20, other
    # Computed per index: a subset or a mixed-epoch batch matches the full epochs.
    picked = np.array([999, 0, 500, 17])
    np.testing.assert_array_equal(permute(picked, n, 4, 2, 1), base[picked])
    epochs = np.array([2, 5, 2, 5])
    mixed = permute(picked, n, 4, epochs, 1)
    np.testing.assert_array_equal(mixed[::2], base[picked[::2]])
    np.testing.assert_array_equal(mixed[1::2], permute(np.arange(n), n, 4, 5, 1)[picked[1::2]])


def test_shuffled_order_is_epoch_by_epoch_permutations():
    n = 37
    order = shuffled(np.arange(3 * n), n, seed=1)
    for e in range(3):
        np.testing.assert_array_equal(order[e * n : (e + 1) * n], permute(np.arange(n), n, 1, e))


def test_a_billion_samples_start_without_allocating_them():
    tracemalloc.start()
    try:
        sampler = Sampler(10**9, 1024, rank=1, world_size=2, seed=7, consumed_samples=10**12)
        batches = take(sampler, 3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # O(batch): a few arrays of 512 int64; the old rng.permutation(10**9) needed 8 GB.
    assert peak < 1_000_000, peak
    flat = np.concatenate(batches)
    assert flat.shape == (3 * 512,) and len(np.unique(flat)) == flat.size
    assert flat.min() >= 0 and flat.max() < 10**9


def test_unshuffled_sampler_hands_out_positions():
    s = Sampler(10, 4, rank=1, world_size=2, shuffle=False, consumed_samples=8)
    np.testing.assert_array_equal(take(s, 2), [[10, 11], [14, 15]])  # positions go past n


@pytest.mark.parametrize("consumed", [0, N - 3, 5 * N - 1, 10**15 + 7])
def test_any_world_size_sees_the_same_global_batch(consumed):
    """Elastic resume at any point, including mid-batch epoch boundaries."""
    per_world = {
        w: global_batches(w, 5, global_batch_size=8, seed=11, consumed_samples=consumed)
        for w in (1, 2, 4)
    }
    np.testing.assert_array_equal(np.stack(per_world[1]), np.stack(per_world[2]))
    np.testing.assert_array_equal(np.stack(per_world[1]), np.stack(per_world[4]))
    flat = Sampler(N, 40, seed=11).indices_at(consumed, 40)
    np.testing.assert_array_equal(np.concatenate(per_world[1]), flat)
