"""The LR schedule against its closed forms, update by update (no torch, no DeepSpeed)."""

from __future__ import annotations

import math

import pytest

from dsfm.config.load import load_config
from dsfm.config.schema import SCHEDULE_KINDS, ScheduleConfig
from dsfm.train.schedule import lr_at

PEAK = 3e-3


def closed_form(kind: str, k: int, n: int, w: int, ratio: float, frac: float) -> float:
    """Written from the issue's definition: warmup peak*(k+1)/w, then from the last update at
    the peak to the floor at update n-1."""
    floor = PEAK * ratio
    if k < w:
        return PEAK * (k + 1) / w
    if kind == "constant":
        return PEAK
    if kind == "wsd":
        d = max(1, round(frac * n))  # decaying updates, the last one on the floor
        return PEAK if k < n - d else PEAK + (floor - PEAK) * (k - (n - 1 - d)) / d
    span = n - w if w else n - 1  # updates from the last at the peak to the last one
    p = (k - max(w - 1, 0)) / span
    if kind == "linear":
        return PEAK + (floor - PEAK) * p
    return floor + 0.5 * (PEAK - floor) * (1 + math.cos(math.pi * p))


CASES = [  # (max_steps, warmup, min_lr_ratio, decay_fraction)
    (8, 2, 0.1, 0.25),
    (100, 5, 0.1, 0.2),
    (37, 0, 0.0, 0.5),
    (10, 9, 0.3, 0.1),
    (50, 1, 1.0, 1.0 - 1 / 50),
    (14, 3, 0.1, 0.3),  # 3e-3 * 3 / 3 is not 3e-3 in floating point
]


@pytest.mark.parametrize("kind", SCHEDULE_KINDS)
@pytest.mark.parametrize("n, w, ratio, frac", CASES)
def test_every_update_matches_the_closed_form(kind, n, w, ratio, frac):
    s = ScheduleConfig(kind=kind, warmup_steps=w, min_lr_ratio=ratio, decay_fraction=frac)
    got = [lr_at(k, s, PEAK, n) for k in range(n)]
    want = [closed_form(kind, k, n, w, ratio, frac) for k in range(n)]
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    if w:  # the peak itself, at the last warmup update; never above it
        assert got[w - 1] == PEAK and max(got) == PEAK
    last = PEAK if kind == "constant" else PEAK * ratio
    assert got[-1] == pytest.approx(last, rel=1e-12)  # the floor at the last update, k = n-1
    assert all(a >= b for a, b in zip(got[max(w - 1, 0) :], got[max(w, 1) :]))


def test_issue_numbers_five_warmup_updates():
    """The report: 5 warmup updates reached 0.996 x peak, and min_lr one update early."""
    s = ScheduleConfig(kind="cosine", warmup_steps=5, min_lr_ratio=0.1)
    lrs = [lr_at(k, s, 1.0, 20) for k in range(20)]
    assert lrs[:5] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert lrs[-2] > 0.1 and lrs[-1] == pytest.approx(0.1, rel=1e-15)


def test_wsd_holds_the_peak_then_decays_over_the_last_fraction():
    s = ScheduleConfig(kind="wsd", warmup_steps=10, min_lr_ratio=0.0, decay_fraction=0.2)
    lrs = [lr_at(k, s, 1.0, 100) for k in range(100)]
    assert lrs[9:80] == [1.0] * 71  # stable: warmup's last update .. update 79
    assert lrs[80] == pytest.approx(1 - 1 / 20) and lrs[99] == 0.0  # 20 decaying updates


def test_a_one_update_run_ends_on_the_floor():
    s = ScheduleConfig(kind="cosine", warmup_steps=0, min_lr_ratio=0.1)
    assert lr_at(0, s, 1.0, 1) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["schedule.kind=cosin"], "did you mean 'cosine'"),
        (["schedule.decay_fraction=0"], "schedule.decay_fraction must be in (0, 1]"),
        (
            ["schedule.kind=wsd", "schedule.decay_fraction=0.5", "schedule.warmup_steps=60"],
            "overlapping the 60 warmup updates",
        ),
    ],
)
def test_bad_schedules_are_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, ["train.max_steps=100", *overrides])
