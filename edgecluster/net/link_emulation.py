"""Emulated links: a one-way delay and a bandwidth per direction, applied on arrival.

A frame of n bytes sent at t (its sent-at stamp, CLOCK_MONOTONIC: sender and
receiver share one box) is released to the reader no earlier than
t + n / bandwidth + delay. Frames on a link are released in order through one
transfer at a time: the next frame's transfer starts when it was sent or when the
previous one's ended, whichever is later (a "link free at" clock), so a burst queues
as it would on a real link while the sender is never blocked. The receiving Link
holds each frame (net/link.py); a link without emulation pays nothing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

__all__ = ["NO_EMULATION", "ArrivalClock", "LinkEmulation"]


@dataclass(frozen=True, kw_only=True)
class LinkEmulation:
    """One direction of an emulated link, applied where its frames are received."""

    delay_ms: float = 0.0  # one way
    bandwidth_bytes_per_s: float = 0.0  # 0: unlimited

    def __post_init__(self) -> None:
        for what, value in (
            ("delay_ms", self.delay_ms),
            ("bandwidth_bytes_per_s", self.bandwidth_bytes_per_s),
        ):
            if not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"link emulation {what} must be a finite number >= 0 (0: none), got {value}"
                )

    @property
    def active(self) -> bool:
        return bool(self.delay_ms or self.bandwidth_bytes_per_s)


NO_EMULATION = LinkEmulation()


class ArrivalClock:
    """When each frame of one emulated link direction may be read. One reader thread."""

    def __init__(self, emulation: LinkEmulation) -> None:
        self._delay_ns = int(emulation.delay_ms * 1e6)
        rate = emulation.bandwidth_bytes_per_s
        self._ns_per_byte = 1e9 / rate if rate else 0.0
        self._free_at_ns = 0  # when the link ends its last frame's transfer

    def hold(self, sent_at_ns: int, num_bytes: int) -> None:
        """Returns once the frame sent at `sent_at_ns` would have arrived."""
        start_ns = max(sent_at_ns, self._free_at_ns)
        self._free_at_ns = start_ns + int(num_bytes * self._ns_per_byte)
        wait_ns = self._free_at_ns + self._delay_ns - time.monotonic_ns()
        if wait_ns > 0:
            time.sleep(wait_ns / 1e9)
