"""Timed generations: one run's time to first token and decode time, repeated, summarized.

Used by `inference.py` for edgecluster and for transformers alike, so both are
timed and summarized the same way: one warm-up, then `num_runs` repetitions; the
summary is the median with the minimum and maximum beside it (the spread).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True)
class Run:
    """One timed generation: time to first token, then the rest."""

    ttft_s: float
    decode_s: float  # from the first token to the last
    num_tokens: int

    @property
    def tokens_per_s(self) -> float:
        return (self.num_tokens - 1) / self.decode_s


def timed_runs(once: Callable[[], Run], num_runs: int, say: Callable[[str], None]) -> list[Run]:
    once()  # warm-up
    runs = []
    for i in range(num_runs):
        runs.append(once())
        r = runs[-1]
        say(f"  run {i + 1}/{num_runs}: ttft {r.ttft_s * 1e3:.0f} ms, {r.tokens_per_s:.1f} tok/s")
    return runs


def summarize(runs: Sequence[Run]) -> dict[str, Any]:
    rates = [r.tokens_per_s for r in runs]
    ttfts = [r.ttft_s for r in runs]
    return {
        "tokens_per_s": statistics.median(rates),
        "tokens_per_s_min": min(rates),
        "tokens_per_s_max": max(rates),
        "ttft_s": statistics.median(ttfts),
        "ttft_s_min": min(ttfts),
        "ttft_s_max": max(ttfts),
        "num_tokens": [r.num_tokens for r in runs],
    }
