"""water_fill, round_split, split_units: proportional splits under caps."""

from __future__ import annotations

import itertools

import pytest

from edgecluster.plan.split import round_split, split_units, water_fill


def test_water_fill_is_proportional_without_caps() -> None:
    assert water_fill(100.0, [3, 1], [1e9, 1e9]) == pytest.approx([75.0, 25.0])


def test_water_fill_caps_and_refills_in_proportion() -> None:
    parts = water_fill(100.0, [1, 1, 2], [10, 1e9, 1e9])
    assert parts == pytest.approx([10.0, 30.0, 60.0])


def test_water_fill_cascades_caps() -> None:
    parts = water_fill(100.0, [4, 3, 2, 1], [5, 20, 1e9, 1e9])
    assert parts == pytest.approx([5.0, 20.0, 50.0, 25.0])


def test_water_fill_overflow_goes_in_proportion_to_share() -> None:
    parts = water_fill(100.0, [1, 3], [20, 40])  # caps hold 60: 40 over
    assert parts == pytest.approx([30.0, 70.0])


def test_zero_share_gets_nothing() -> None:
    assert water_fill(10.0, [1, 0, 1], [100, 100, 100]) == pytest.approx([5.0, 0.0, 5.0])


@pytest.mark.parametrize("shares", [[0, 0], [1, -1], [float("inf"), 1]])
def test_bad_shares(shares: list[float]) -> None:
    with pytest.raises(ValueError, match="share"):
        water_fill(1.0, shares, [1, 1])


def test_round_split_largest_remainder() -> None:
    assert round_split(10, [3.3, 3.3, 3.4]) == [3, 3, 4]
    assert round_split(3, [1.5, 1.5, 0.0]) == [2, 1, 0]  # ties to the earlier part


def test_round_split_respects_caps() -> None:
    assert round_split(4, [1.5, 1.5, 1.0], caps=[1, 3, 3]) == [1, 2, 1]


@pytest.mark.parametrize(
    ("total", "shares"),
    [(n, s) for n, s in itertools.product((1, 3, 9, 1536), ([1], [1, 1], [5, 3, 1], [1] * 12))],
)
def test_split_units_sums_to_total(total: int, shares: list[float]) -> None:
    counts = split_units(total, shares, [total] * len(shares))
    assert sum(counts) == total and min(counts) >= 0
    ideal = [total * s / sum(shares) for s in shares]
    assert all(abs(c - i) < 1 for c, i in zip(counts, ideal, strict=True))


def test_split_units_water_fills_integer_caps() -> None:
    assert split_units(10, [1, 1, 1], [2, 10, 10]) == [2, 4, 4]


def test_split_units_overflows_past_caps_in_proportion() -> None:
    assert split_units(10, [1, 1], [2, 2]) == [5, 5]
