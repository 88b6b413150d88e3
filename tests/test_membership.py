"""Membership with an injected clock: join, heartbeat, silence -> dead, leave, rejoin."""

from __future__ import annotations

import threading

import pytest

from edgecluster.runtime.membership import ALIVE, DEAD, LEFT, Membership
from edgecluster.types import DeviceProfile, MemberInfo, NodeId

TIMEOUT_S = 2.5


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _member(node_id: str, name: str, address: str = "127.0.0.1:1", **profile: int) -> MemberInfo:
    return MemberInfo(
        id=NodeId(node_id),
        name=name,
        address=address,
        data_port=2,
        state="whatever: join makes it alive",
        profile=DeviceProfile(
            cpu_count=4,
            memory_total_bytes=8 << 30,
            memory_available_bytes=profile.get("available", 4 << 30),
            disk_free_bytes=1 << 40,
            disk_read_bytes_per_s=5e8,
            matmul_gflops=20.0,
        ),
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def members(clock: FakeClock) -> tuple[Membership, list[tuple[str, str]]]:
    m = Membership(timeout_s=TIMEOUT_S, clock=clock)
    events: list[tuple[str, str]] = []
    m.subscribe(lambda member, event: events.append((member.name, event)))
    return m, events


def _states(m: Membership) -> dict[str, str]:
    return {x.name: x.state for x in m.snapshot()}


def test_join_lists_the_member_alive(members, clock: FakeClock) -> None:
    m, events = members
    m.join(_member("b2", "bravo"))
    m.join(_member("a1", "alpha"))
    snapshot = m.snapshot()
    assert [x.name for x in snapshot] == ["alpha", "bravo"]  # sorted by name
    assert all(x.state == ALIVE and x.last_seen_s_ago == 0.0 for x in snapshot)
    assert [x.id for x in m.alive()] == ["a1", "b2"]
    assert m.get(NodeId("a1")) is not None and m.get(NodeId("zz")) is None
    assert events == [("bravo", "joined"), ("alpha", "joined")]
    clock.advance(1.25)
    assert {x.last_seen_s_ago for x in m.snapshot()} == {1.25}


def test_heartbeats_keep_a_member_alive_and_update_available_memory(members, clock) -> None:
    m, _ = members
    m.join(_member("a1", "alpha"))
    for _ in range(10):  # 10 x 2 s = 20 s, far beyond the timeout, but never silent that long
        clock.advance(2.0)
        assert m.heartbeat(NodeId("a1"), memory_available_bytes=123 << 20)
        m.sweep()
    assert _states(m) == {"alpha": ALIVE}
    assert m.snapshot()[0].profile.memory_available_bytes == 123 << 20
    assert m.heartbeat(NodeId("a1"), None)  # no figure: the last one stays
    assert m.snapshot()[0].profile.memory_available_bytes == 123 << 20


def test_silence_beyond_the_timeout_makes_a_member_dead(members, clock) -> None:
    m, events = members
    m.join(_member("a1", "alpha"))
    m.join(_member("b2", "bravo"))
    clock.advance(TIMEOUT_S)
    m.heartbeat(NodeId("b2"))
    m.sweep()
    assert _states(m) == {"alpha": ALIVE, "bravo": ALIVE}  # exactly the timeout: not yet
    clock.advance(0.01)
    m.sweep()
    assert _states(m) == {"alpha": DEAD, "bravo": ALIVE}
    assert [x.name for x in m.alive()] == ["bravo"]
    m.sweep()  # already dead: no second event
    assert events.count(("alpha", "dead")) == 1


def test_a_dead_members_heartbeat_is_refused_until_it_joins_again(members, clock) -> None:
    m, events = members
    m.join(_member("a1", "alpha", address="127.0.0.1:1"))
    clock.advance(TIMEOUT_S + 1)
    m.sweep()
    assert not m.heartbeat(NodeId("a1"))  # the agent is told to join again
    assert _states(m) == {"alpha": DEAD}
    m.join(_member("a1", "alpha", address="127.0.0.1:2"))
    assert _states(m) == {"alpha": ALIVE}
    assert len(m.snapshot()) == 1 and m.snapshot()[0].address == "127.0.0.1:2"
    assert m.snapshot()[0].last_seen_s_ago == 0.0
    assert events == [("alpha", "joined"), ("alpha", "dead"), ("alpha", "joined")]


def test_leave_is_at_once_and_final_until_a_rejoin(members, clock) -> None:
    m, events = members
    m.join(_member("a1", "alpha"))
    m.leave(NodeId("a1"))
    assert _states(m) == {"alpha": LEFT}
    clock.advance(60)
    m.sweep()  # a left member does not turn dead
    assert _states(m) == {"alpha": LEFT}
    assert not m.heartbeat(NodeId("a1"))
    m.leave(NodeId("a1"))  # idempotent
    m.join(_member("a1", "alpha"))
    assert _states(m) == {"alpha": ALIVE}
    assert events == [("alpha", "joined"), ("alpha", "left"), ("alpha", "joined")]


def test_unknown_nodes_are_ignored(members) -> None:
    m, events = members
    assert not m.heartbeat(NodeId("nobody"))
    m.leave(NodeId("nobody"))
    m.mark_dead(NodeId("nobody"))
    assert m.snapshot() == [] and events == []


def test_a_failing_listener_does_not_stop_membership(members) -> None:
    m, events = members

    def broken(member: MemberInfo, event: str) -> None:
        raise RuntimeError("listener bug")

    m.subscribe(broken)
    m.join(_member("a1", "alpha"))
    m.mark_dead(NodeId("a1"))
    assert _states(m) == {"alpha": DEAD}
    assert events == [("alpha", "joined"), ("alpha", "dead")]  # later listeners still called


def test_wait_for_change_wakes_on_a_join(members) -> None:
    m, _ = members
    woke = threading.Event()

    def waiter() -> None:
        m.wait_for_change(10.0)
        woke.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    # A join before the waiter waits would be missed, so keep joining until it wakes.
    for i in range(200):
        m.join(_member(f"n{i}", f"node{i}"))
        if woke.wait(0.02):
            break
    thread.join(5)
    assert woke.is_set()


def test_the_sweeper_thread_declares_the_silent_dead(members, clock) -> None:
    m, _ = members
    m.join(_member("a1", "alpha"))
    clock.advance(TIMEOUT_S + 0.5)
    stop = threading.Event()
    thread = m.run_sweeper(stop, interval_s=0.01)
    try:
        for _ in range(500):
            if _states(m) == {"alpha": DEAD}:
                break
            m.wait_for_change(0.01)
        assert _states(m) == {"alpha": DEAD}
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()


def test_a_second_join_of_an_alive_member_updates_its_profile_and_keeps_its_runtime(
    members,
) -> None:
    from dataclasses import replace

    from edgecluster.types import AgentRuntime

    m, events = members
    light = _member("a1", "alpha")
    light = replace(light, profile=replace(light.profile, matmul_gflops=0.0), data_port=0)
    m.join(light)
    m.heartbeat(NodeId("a1"), runtime=AgentRuntime(rss_bytes=123 << 20))
    m.join(_member("a1", "alpha"))  # the measured profile, with its data port
    member = m.get(NodeId("a1"))
    assert member is not None and member.state == ALIVE
    assert member.profile.matmul_gflops == 20.0 and member.data_port == 2
    assert member.runtime.rss_bytes == 123 << 20
    assert [x.name for x in m.snapshot()] == ["alpha"]
    assert events == [("alpha", "joined"), ("alpha", "updated")]
