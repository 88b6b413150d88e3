"""Who is in the cluster: joins, heartbeats, leaves, and the dead.

Thread-safe. A node is `alive` while heartbeats arrive, `dead` once none came for
`timeout_s`, `left` after an orderly leave. A node that joins again with the same
id (same name and data dir) is the same member, alive again. A join from a member
that is alive already updates it (an agent joins first with a light profile, then
with its measured one): listeners hear `updated`, not `joined`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from edgecluster.types import AgentRuntime, MemberInfo, NodeId

log = logging.getLogger(__name__)

ALIVE, DEAD, LEFT = "alive", "dead", "left"
Listener = Callable[[MemberInfo, str], None]  # (member, event: joined|updated|dead|left)


class Membership:
    def __init__(self, timeout_s: float = 2.5, clock: Callable[[], float] = time.monotonic) -> None:
        self._timeout_s = timeout_s
        self._clock = clock
        self._members: dict[NodeId, MemberInfo] = {}
        self._seen: dict[NodeId, float] = {}
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []
        self._changed = threading.Condition(self._lock)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def join(self, member: MemberInfo) -> None:
        with self._lock:
            before = self._members.get(member.id)
            update = before is not None and before.state == ALIVE
            if update and before is not None:
                member = replace(member, runtime=before.runtime)  # heartbeats keep it fresh
            self._members[member.id] = replace(member, state=ALIVE)
            self._seen[member.id] = self._clock()
            self._changed.notify_all()
        if update:
            log.info("agent %s (%s) updated its profile", member.name, member.id[:8])
            self._emit(member, "updated")
            return
        log.info("agent %s (%s) joined from %s", member.name, member.id[:8], member.address)
        self._emit(member, "joined")

    def heartbeat(
        self,
        node_id: NodeId,
        memory_available_bytes: int | None = None,
        runtime: AgentRuntime | None = None,
    ) -> bool:
        """False when the node is unknown or was declared gone (it must join again)."""
        with self._lock:
            member = self._members.get(node_id)
            if member is None or member.state != ALIVE:
                return False
            self._seen[node_id] = self._clock()
            if memory_available_bytes:
                profile = replace(member.profile, memory_available_bytes=memory_available_bytes)
                member = replace(member, profile=profile)
            if runtime is not None:
                member = replace(member, runtime=runtime)
            self._members[node_id] = member
            return True

    def leave(self, node_id: NodeId) -> None:
        self._mark(node_id, LEFT)

    def mark_dead(self, node_id: NodeId) -> None:
        self._mark(node_id, DEAD)

    def _mark(self, node_id: NodeId, state: str) -> None:
        with self._lock:
            member = self._members.get(node_id)
            if member is None or member.state == state:
                return
            member = replace(member, state=state)
            self._members[node_id] = member
            self._changed.notify_all()
        log.info("agent %s (%s) is %s", member.name, node_id[:8], state)
        self._emit(member, state)

    def sweep(self) -> None:
        """Declares dead every alive node silent for longer than the timeout."""
        now = self._clock()
        with self._lock:
            silent = [
                nid
                for nid, m in self._members.items()
                if m.state == ALIVE and now - self._seen[nid] > self._timeout_s
            ]
        for nid in silent:
            self._mark(nid, DEAD)

    def snapshot(self) -> list[MemberInfo]:
        now = self._clock()
        with self._lock:
            return [
                replace(m, last_seen_s_ago=now - self._seen[m.id])
                for m in sorted(self._members.values(), key=lambda m: m.name)
            ]

    def alive(self) -> list[MemberInfo]:
        return [m for m in self.snapshot() if m.state == ALIVE]

    def get(self, node_id: NodeId) -> MemberInfo | None:
        with self._lock:
            return self._members.get(node_id)

    def wait_for_change(self, timeout_s: float) -> None:
        with self._changed:
            self._changed.wait(timeout_s)

    def _emit(self, member: MemberInfo, event: str) -> None:
        for listener in self._listeners:
            try:
                listener(member, event)
            except Exception:  # a listener's bug must not stop membership
                log.exception("membership listener failed on %s %s", event, member.name)

    def run_sweeper(self, stop: threading.Event, interval_s: float = 0.25) -> threading.Thread:
        def loop() -> None:
            while not stop.wait(interval_s):
                self.sweep()

        thread = threading.Thread(target=loop, name="membership-sweep", daemon=True)
        thread.start()
        return thread
