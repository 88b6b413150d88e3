"""Proportional splits with caps (water-filling), and their rounding to integers.

Pure arithmetic over sequences of numbers, shared by the planners; it knows nothing
of models or agents. Shares are non-negative and at least one is positive; a part
with zero share gets nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def water_fill(total: float, shares: Sequence[float], caps: Sequence[float]) -> list[float]:
    """Split `total` in proportion to `shares` with no part above its cap.

    Parts that would pass their cap are held at it and what is left is shared again
    among the others, in proportion. When the caps of the positive-share parts hold
    less than `total`, every positive-share part gets its cap plus a piece of the
    overflow in proportion to its share: the caller decides what a part above its cap
    means (for weights: that agent streams).
    """
    _check_shares(shares, len(caps))
    positive = [i for i, share in enumerate(shares) if share > 0]
    floors = [max(0.0, float(cap)) for cap in caps]
    room = sum(floors[i] for i in positive)
    if room < total:
        total_share = sum(shares)
        overflow = total - room
        return [
            floors[i] + overflow * share / total_share if share > 0 else 0.0
            for i, share in enumerate(shares)
        ]
    parts = [0.0] * len(shares)
    free, left = positive, float(total)
    while free:
        free_share = sum(shares[i] for i in free)
        over = [i for i in free if left * shares[i] / free_share > floors[i]]
        if not over:
            for i in free:
                parts[i] = left * shares[i] / free_share
            break
        for i in over:
            parts[i] = floors[i]
            left -= floors[i]
        free = [i for i in free if i not in over]
    return parts


def round_split(total: int, parts: Sequence[float], caps: Sequence[int] | None = None) -> list[int]:
    """Integers that sum to `total`, each the floor or ceiling of its part.

    Largest remainder first, ties to the earlier part; with `caps`, no integer goes
    above its cap. `parts` must sum to `total` (within rounding error).
    """
    if caps is not None and len(caps) != len(parts):
        raise ValueError(f"got {len(caps)} caps for {len(parts)} parts")
    counts = [math.floor(part + 1e-9) for part in parts]
    limits = list(caps) if caps is not None else [total] * len(parts)
    counts = [min(count, limit) for count, limit in zip(counts, limits, strict=True)]
    order = sorted(range(len(parts)), key=lambda i: (counts[i] - parts[i], i))
    left = total - sum(counts)
    for i in order:
        if left <= 0:
            break
        if counts[i] < limits[i] and parts[i] > 0:
            counts[i] += 1
            left -= 1
    if left != 0:
        raise ValueError(f"cannot split {total} units over parts {list(parts)} within caps {caps}")
    return counts


def split_units(total: int, shares: Sequence[float], caps: Sequence[int]) -> list[int]:
    """Split `total` whole units in proportion to `shares`, water-filled under `caps`.

    When the caps hold all units no count passes its cap; otherwise every
    positive-share part gets its cap plus a proportional piece of the overflow.
    """
    parts = water_fill(float(total), shares, [float(cap) for cap in caps])
    positive_room = sum(max(0, cap) for cap, share in zip(caps, shares, strict=True) if share > 0)
    return round_split(total, parts, list(caps) if positive_room >= total else None)


def _check_shares(shares: Sequence[float], expected: int) -> None:
    if len(shares) != expected:
        raise ValueError(f"got {len(shares)} shares for {expected} parts")
    if any(not math.isfinite(share) or share < 0 for share in shares):
        raise ValueError(f"shares must be finite and non-negative, got {list(shares)}")
    if not any(share > 0 for share in shares):
        raise ValueError(f"at least one share must be positive, got {list(shares)}")
