"""The one home of printed numbers: every table reads counts and durations the same way."""

from __future__ import annotations

import math

import pytest

from dsfm.observe.numbers import duration, finite_or_none, human, is_finite, scientific


@pytest.mark.parametrize(
    "n, text",
    [(None, "-"), (7, "7"), (0.25, "0.25"), (1234, "1.23K"), (4.26e6, "4.26M"), (1.4e9, "1.4B")],
)
def test_counts(n, text):
    assert human(n) == text


@pytest.mark.parametrize(
    "s, text",
    [
        (None, "-"),
        (0.3, "< 1 s"),
        (12.34, "12.3 s"),
        (303, "5m03s"),
        (7500, "2h05m"),
        (273600, "3d04h"),
    ],
)
def test_durations(s, text):
    assert duration(s) == text


def test_only_finite_real_numbers_count():
    assert [finite_or_none(x) for x in (1.5, 3, math.nan, math.inf, True, "2", None)] == [
        1.5,
        3,
        None,
        None,
        None,
        None,
        None,
    ]
    assert is_finite(0.0) and not is_finite(-math.inf)


@pytest.mark.parametrize(
    "x, text",
    [
        (0.0, "0"),
        (3e-3, "3e-3"),
        (0.0025, "2.5e-3"),
        (5e-4, "5e-4"),
        (1.0, "1e0"),
        (0.00013, "1.3e-4"),
        (-2e-5, "-2e-5"),
    ],  # fmt: skip
)
def test_scientific_as_configs_write_it(x, text):
    assert scientific(x) == text
