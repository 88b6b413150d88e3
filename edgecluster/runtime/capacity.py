"""The speed the coordinator plans with, per agent, kept steady across re-measurements.

An agent measures its matmul speed at every start, and a busy machine measures low:
the same device may report 61 GFLOPS under load and 89 when idle. Planning with each
new figure would move the split at every rejoin, and a moved split is a new shard
(a restarted agent would fetch everything again instead of reusing its cache). So
the coordinator remembers, per node id, the capacity it planned with and keeps it
while a new measurement stays within `tolerance` (a factor) of it; only a real
change (a different device behind the id, a new quota) moves the plan.
"""

from __future__ import annotations

import math
import threading

import psutil

from edgecluster.errors import PlanError


def capacity_bucket(gflops: float) -> float:
    """Measured speed rounded to half-octaves, so re-measuring rarely changes the plan."""
    return 2 ** (round(2 * math.log2(max(gflops, 0.01))) / 2)


class CapacityMemory:
    """node id -> the (bucketed) GFLOPS a plan used; thread-safe."""

    def __init__(self, tolerance: float = 2.0) -> None:
        if tolerance < 1.0:
            raise ValueError(f"tolerance is a factor >= 1, got {tolerance}")
        self._tolerance = tolerance
        self._planned: dict[str, float] = {}
        self._lock = threading.Lock()

    def planned(self, node_id: str, measured_gflops: float) -> float:
        """The capacity to plan `node_id` with, given its latest measurement."""
        with self._lock:
            before = self._planned.get(node_id)
            if before is not None and before / self._tolerance <= measured_gflops <= (
                before * self._tolerance
            ):
                return before
            chosen = capacity_bucket(measured_gflops)
            self._planned[node_id] = chosen
            return chosen


def check_hub_memory(limit_bytes: int, hub_weight_bytes: int) -> None:
    """The coordinator's embedding and LM head count against its --memory-limit."""
    if not limit_bytes:
        return
    rss = int(psutil.Process().memory_info().rss)
    if rss > limit_bytes:
        raise PlanError(
            f"the coordinator holds the embedding, final norm and LM head "
            f"({hub_weight_bytes / 2**20:.0f} MiB) and now uses {rss / 2**20:.0f} MiB, over "
            f"its --memory-limit {limit_bytes / 2**20:.0f} MiB; raise the limit"
        )
