"""Read deadlines and keepalives of a session's links, two ranks over 127.0.0.1.

Inside a step a rank busy for longer than the read deadline stays alive through its
keepalives; a rank that sends nothing is named once the deadline passes; outside a
step nothing times out and nothing is sent.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from edgecluster.comm.communicator import Communicator, SessionConfig, default_read_deadline_s
from edgecluster.errors import PeerLostError
from edgecluster.net.datachannel import DataListener

DEADLINE_S = 0.6


@pytest.fixture
def pair() -> Iterator[tuple[Communicator, Communicator]]:
    listeners = [DataListener("127.0.0.1") for _ in range(2)]
    key, session = secrets.token_bytes(32), f"ka-{secrets.token_hex(3)}"
    endpoints = tuple(f"127.0.0.1:{listener.port}" for listener in listeners)
    for listener in listeners:
        listener.expect(session, key)

    def connect(rank: int) -> Communicator:
        config = SessionConfig(
            session_id=session, session_key=key, rank=rank, endpoints=endpoints,
            read_deadline_s=DEADLINE_S,
        )  # fmt: skip
        return Communicator.connect(config, listeners[rank], ["hub", "busy-agent"])

    with ThreadPoolExecutor(2) as pool:
        hub, agent = pool.map(connect, (0, 1))
    yield hub, agent
    for comm in (hub, agent):
        comm.close()
    for listener in listeners:
        listener.close()


def _agent_reduces_after(agent: Communicator, delay_s: float, in_step: bool) -> threading.Thread:
    def work() -> None:
        if in_step:
            agent.begin_step()
        agent.broadcast(None)  # the hub's input arrives: the link is in use this step
        time.sleep(delay_s)  # "computing"
        with contextlib.suppress(PeerLostError):  # the hub gave up on a silent agent
            agent.reduce(torch.ones(3))
        agent.end_step()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def test_a_busy_rank_outlives_the_deadline_through_keepalives(
    pair: tuple[Communicator, Communicator],
) -> None:
    hub, agent = pair
    worker = _agent_reduces_after(agent, 4 * DEADLINE_S, in_step=True)
    with hub.step():
        hub.broadcast(torch.zeros(1))
        total = hub.reduce(torch.ones(3))
    worker.join(5)
    assert total is not None and torch.equal(total, torch.full((3,), 2.0))


def test_a_silent_rank_is_named_once_the_deadline_passes(
    pair: tuple[Communicator, Communicator],
) -> None:
    hub, agent = pair
    worker = _agent_reduces_after(agent, 4 * DEADLINE_S, in_step=False)  # no keepalives
    started = time.monotonic()
    with hub.step(), pytest.raises(PeerLostError) as err:
        hub.broadcast(torch.zeros(1))
        hub.reduce(torch.ones(3))
    waited = time.monotonic() - started
    assert err.value.peer == "busy-agent"
    assert "no data or keepalive from busy-agent for 0.6 s: stopped or hung" in str(err.value)
    assert DEADLINE_S <= waited < 4 * DEADLINE_S
    worker.join(10)


def test_outside_a_step_a_read_waits_and_nothing_is_sent(
    pair: tuple[Communicator, Communicator],
) -> None:
    hub, agent = pair
    got: list[torch.Tensor] = []
    reader = threading.Thread(target=lambda: got.append(agent.broadcast(None)), daemon=True)
    reader.start()
    time.sleep(3 * DEADLINE_S)  # an idle hub: the agent's read must not time out
    assert reader.is_alive() and not got
    assert not hub.link(1).buffered and not agent.link(0).buffered  # no keepalives piled up
    hub.broadcast(torch.arange(3))
    reader.join(5)
    assert got and torch.equal(got[0], torch.arange(3))


def test_the_deadline_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGE_READ_DEADLINE_S", raising=False)
    assert default_read_deadline_s() == 5.0
    monkeypatch.setenv("EDGE_READ_DEADLINE_S", "2.5")
    assert default_read_deadline_s() == 2.5
    monkeypatch.setenv("EDGE_READ_DEADLINE_S", "soon")
    with pytest.raises(ValueError, match="EDGE_READ_DEADLINE_S='soon'"):
        default_read_deadline_s()
    monkeypatch.setenv("EDGE_READ_DEADLINE_S", "0")
    with pytest.raises(ValueError, match="EDGE_READ_DEADLINE_S must be > 0"):
        SessionConfig(session_id="s", session_key=b"k" * 16, rank=0, endpoints=("a:1",))
