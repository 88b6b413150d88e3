"""A session's configuration: its ranks, key, all-reduce algorithm, liveness and links.

Validated where it is made (the agent builds it from a peer's SessionSpec), so a bad
figure is refused with a message naming the field before any link opens.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from edgecluster.net.datachannel import NO_EMULATION, LinkEmulation
from edgecluster.net.polling_reader import env_amount

ALGORITHMS = ("star", "ring", "direct")
DIRECT_MAX_BYTES = 64 << 10
DEFAULT_READ_DEADLINE_S = 5.0
MB = 1_000_000  # link bandwidths are in MB/s, as in the cluster file


def serving_algorithm() -> str:
    """EDGE_ALLREDUCE (star, ring or direct), else direct: the agents' decode steps are
    small payloads, and direct pays one link latency where star pays two."""
    name = os.environ.get("EDGE_ALLREDUCE", "").strip() or "direct"
    if name not in ALGORITHMS:
        raise ValueError(f"EDGE_ALLREDUCE={name!r}: choose one of {', '.join(ALGORITHMS)}")
    return name


def default_read_deadline_s() -> float:
    """EDGE_READ_DEADLINE_S, else DEFAULT_READ_DEADLINE_S."""
    value = env_amount("EDGE_READ_DEADLINE_S", "seconds")
    return DEFAULT_READ_DEADLINE_S if value is None else value


@dataclass(frozen=True, kw_only=True)
class SessionConfig:
    session_id: str
    session_key: bytes
    rank: int
    endpoints: tuple[str, ...]  # data-channel host:port of each rank
    algorithm: str = "star"
    link_delay_ms: float = 0.0  # emulated one-way delay of every link (see link_delays_ms)
    # Per peer rank, the emulated link from that rank to this one, applied as its frames
    # arrive (net/link.py): one-way delay and bandwidth (0: unlimited). Empty:
    # link_delay_ms from every peer, unlimited bandwidth. This rank's own entry is unused.
    link_delays_ms: tuple[float, ...] = ()
    link_bandwidths_mb_s: tuple[float, ...] = ()
    connect_timeout_s: float = 15.0
    encrypt: bool = False  # frames sealed with AEAD (TLS clusters); else MACed
    read_deadline_s: float = 0.0  # in a step; 0: EDGE_READ_DEADLINE_S or 5 s
    keepalive_interval_s: float = 0.0  # 0: a fifth of the read deadline, at most 1 s

    def __post_init__(self) -> None:
        if self.read_deadline_s < 0 or self.keepalive_interval_s < 0:
            raise ValueError("read_deadline_s and keepalive_interval_s must be >= 0")
        if not self.read_deadline_s:
            object.__setattr__(self, "read_deadline_s", default_read_deadline_s())
        if not self.read_deadline_s:
            raise ValueError("EDGE_READ_DEADLINE_S must be > 0 seconds")
        if not self.keepalive_interval_s:
            object.__setattr__(self, "keepalive_interval_s", min(1.0, self.read_deadline_s / 5))
        if self.keepalive_interval_s >= self.read_deadline_s:
            raise ValueError(
                f"keepalive interval {self.keepalive_interval_s} s must be shorter than the "
                f"read deadline {self.read_deadline_s} s"
            )
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm {self.algorithm!r}: choose one of {ALGORITHMS}")
        if not 0 <= self.rank < len(self.endpoints):
            raise ValueError(f"rank {self.rank} outside a session of {len(self.endpoints)}")
        if len(self.session_key) < 16:
            raise ValueError("session key must be at least 16 bytes")
        self._check_links()

    def _check_links(self) -> None:
        """Per-rank link figures: one per rank (or none), each finite and >= 0."""
        _check_amount("link_delay_ms", self.link_delay_ms)
        for name in ("link_delays_ms", "link_bandwidths_mb_s"):
            values = tuple(float(v) for v in getattr(self, name))
            object.__setattr__(self, name, values)
            if values and len(values) != self.world_size:
                raise ValueError(
                    f"{name} has {len(values)} entries for a session of {self.world_size} "
                    "ranks: give one per rank, in rank order (this rank's own is unused), or "
                    "none"
                )
            for peer, value in enumerate(values):
                _check_amount(f"{name}[{peer}]", value)

    def link_emulation(self, peer: int) -> LinkEmulation:
        """The emulated link from rank `peer` to this rank (none from itself)."""
        if peer == self.rank:
            return NO_EMULATION
        delay_ms = self.link_delays_ms[peer] if self.link_delays_ms else self.link_delay_ms
        mb_s = self.link_bandwidths_mb_s[peer] if self.link_bandwidths_mb_s else 0.0
        if not delay_ms and not mb_s:
            return NO_EMULATION
        return LinkEmulation(delay_ms=delay_ms, bandwidth_bytes_per_s=mb_s * MB)

    @property
    def world_size(self) -> int:
        return len(self.endpoints)


def _check_amount(what: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0 (0: no emulation), got {value}")
