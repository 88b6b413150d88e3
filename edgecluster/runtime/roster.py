"""Which agents the serving supervisor may plan with, and with what capacity.

An agent is eligible when it is alive, has sent its measured profile (agents join
first with a light one), and is not in quarantine. An agent that missed a deadline
(alive but hung) is marked dead and quarantined for `quarantine_s`, so heartbeats
that bring it back do not put it into the next plan at once; one that could not be
reached is only marked dead (a restart may rejoin right away). Capacities come from
CapacityMemory, so a rejoin re-measured under different load keeps its split.
"""

from __future__ import annotations

import logging
import time

from edgecluster.runtime.agent_calls import AgentCallsFailed
from edgecluster.runtime.capacity import CapacityMemory
from edgecluster.runtime.membership import Membership
from edgecluster.types import MemberInfo, NodeId

log = logging.getLogger(__name__)

QUARANTINE_S = 60.0


class Roster:
    def __init__(self, membership: Membership, quarantine_s: float = QUARANTINE_S) -> None:
        self._membership = membership
        self._quarantine_s = quarantine_s
        self._until: dict[str, float] = {}  # node id -> monotonic time it may return
        self.capacities = CapacityMemory()

    def eligible(self) -> list[MemberInfo]:
        """Alive agents that finished profiling and are not in quarantine."""
        now = time.monotonic()
        return [
            m
            for m in self._membership.alive()
            if m.profile.matmul_gflops > 0 and self._until.get(m.id, 0.0) <= now
        ]

    def planned_gflops(self, member: MemberInfo) -> float:
        return self.capacities.planned(member.id, member.profile.matmul_gflops)

    def drop_hung(self, node_id: str, name: str, why: str) -> None:
        """An agent alive but not answering: dead, and out of plans for a while."""
        log.warning(
            "dropping agent %s: %s; planning without it for %.0f s", name, why, self._quarantine_s
        )
        self._until[node_id] = time.monotonic() + self._quarantine_s
        self._membership.mark_dead(NodeId(node_id))

    def drop_unresponsive(self, exc: AgentCallsFailed) -> bool:
        """Drops every agent that missed a deadline or could not be reached; True when
        any was dropped (the next attempt can go ahead without them)."""
        dropped = False
        for failure in exc.failures:
            if not failure.unresponsive:
                log.warning("could not establish a session: %s", failure)
                continue
            dropped = True
            if failure.missed_deadline:
                self.drop_hung(failure.node_id, failure.name, f"{failure.call} missed its deadline")
            else:
                log.warning(
                    "dropping agent %s: %s found it unreachable", failure.name, failure.call
                )
                self._membership.mark_dead(NodeId(failure.node_id))
        return dropped
