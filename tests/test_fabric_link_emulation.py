"""Emulated links: per-direction delay and bandwidth, applied where frames arrive.

A frame of n bytes sent at t is released no earlier than t + delay + n / bandwidth,
frames on a link are released in order through one transfer at a time, and a
session applies each peer's figures to that peer's link. Real sockets on 127.0.0.1;
lower bounds on time only (a loaded machine makes upper bounds flaky).
"""

from __future__ import annotations

import math
import secrets
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from edgecluster.comm.communicator import Communicator, SessionConfig
from edgecluster.net.datachannel import NO_EMULATION, DataListener, Link, LinkEmulation
from edgecluster.net.frame_seal import MAC, TO_CLIENT, TO_SERVER, FrameSeal
from edgecluster.net.pb import edgecluster_pb2 as pb
from edgecluster.runtime.agent_session import SessionRequest

KEY = secrets.token_bytes(32)


@pytest.fixture
def pair() -> Iterator[tuple[Link, Link]]:
    """A sender and a receiver Link on a loopback TCP pair, frames MACed."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    sender, receiver = Link(a, "receiver", spin_us=0), Link(b, "sender", spin_us=0)
    sender.protect(FrameSeal(KEY, mode=MAC, outgoing=TO_SERVER, incoming=TO_CLIENT))
    receiver.protect(FrameSeal(KEY, mode=MAC, outgoing=TO_CLIENT, incoming=TO_SERVER))
    yield sender, receiver
    sender.close()
    receiver.close()


def test_a_delayed_link_releases_no_frame_early_and_keeps_their_order(
    pair: tuple[Link, Link],
) -> None:
    sender, receiver = pair
    receiver.emulate(LinkEmulation(delay_ms=30))
    tensors = [torch.full((3,), float(i)) for i in range(5)]
    sent_at = []
    for t in tensors:
        sent_at.append(time.monotonic())
        sender.send_tensor(t)
        time.sleep(0.005)
    for i, expected in enumerate(tensors):
        got = receiver.recv_tensor()
        assert time.monotonic() - sent_at[i] >= 0.030, f"frame {i} released early"
        assert torch.equal(got, expected), f"frame {i} out of order"
    start = time.monotonic()
    sender.send_frame(pb.Frame(kind=pb.Frame.BYE))  # control frames are held too
    assert receiver.recv_frame().kind == pb.Frame.BYE
    assert time.monotonic() - start >= 0.030


@pytest.mark.parametrize("numel", [50_000, 25_000], ids=["200kB-read-in-place", "100kB-buffered"])
def test_bandwidth_holds_a_frame_for_its_transfer_time(pair: tuple[Link, Link], numel: int) -> None:
    """1 MB/s: 200 kB take 0.2 s, as one tensor or as two back to back (the second
    one's transfer starts when the first one's ended)."""
    sender, receiver = pair
    receiver.emulate(LinkEmulation(bandwidth_bytes_per_s=1e6))
    count = 200_000 // (numel * 4)
    tensors = [torch.randn(numel) for _ in range(count)]
    start = time.monotonic()
    writer = threading.Thread(target=lambda: [sender.send_tensor(t) for t in tensors])
    writer.start()
    received = [receiver.recv_tensor() for _ in tensors]
    elapsed = time.monotonic() - start
    writer.join(10)
    assert all(torch.equal(a, b) for a, b in zip(received, tensors, strict=True))
    assert elapsed >= 0.2, f"{count} x {numel * 4} B over 1 MB/s took {elapsed:.3f} s"


def test_an_idle_link_does_not_bank_transfer_time(pair: tuple[Link, Link]) -> None:
    """The 'link free at' clock starts each transfer no earlier than its frame was sent."""
    sender, receiver = pair
    receiver.emulate(LinkEmulation(delay_ms=20, bandwidth_bytes_per_s=1e6))
    sender.send_tensor(torch.zeros(10))
    receiver.recv_tensor()
    time.sleep(0.1)  # the emulated link is idle again
    start = time.monotonic()
    sender.send_tensor(torch.zeros(25_000))  # 100 kB: 0.1 s at 1 MB/s, then 20 ms
    receiver.recv_tensor()
    assert time.monotonic() - start >= 0.12


def test_link_emulation_refuses_negative_and_non_finite_figures() -> None:
    with pytest.raises(ValueError, match="delay_ms must be a finite number >= 0"):
        LinkEmulation(delay_ms=-1)
    with pytest.raises(ValueError, match="bandwidth_bytes_per_s must be a finite number"):
        LinkEmulation(bandwidth_bytes_per_s=math.inf)
    assert not NO_EMULATION.active and LinkEmulation(bandwidth_bytes_per_s=1).active


def _config(rank: int, **links: object) -> SessionConfig:
    return SessionConfig(
        session_id="s",
        session_key=KEY,
        rank=rank,
        endpoints=("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"),
        **links,  # type: ignore[arg-type]
    )


def test_session_config_gives_each_peer_its_own_link() -> None:
    config = _config(1, link_delays_ms=[5, 0, 40], link_bandwidths_mb_s=[0, 0, 2.5])
    assert config.link_delays_ms == (5.0, 0.0, 40.0)  # lists become tuples
    assert config.link_emulation(0) == LinkEmulation(delay_ms=5)
    assert config.link_emulation(1) is NO_EMULATION  # itself
    assert config.link_emulation(2) == LinkEmulation(delay_ms=40, bandwidth_bytes_per_s=2.5e6)
    scalar = _config(2, link_delay_ms=7)  # no matrix: the scalar delay from every peer
    assert scalar.link_emulation(0) == scalar.link_emulation(1) == LinkEmulation(delay_ms=7)


@pytest.mark.parametrize(
    ("links", "message"),
    [
        ({"link_delays_ms": (1.0, 2.0)}, "link_delays_ms has 2 entries for a session of 3"),
        ({"link_bandwidths_mb_s": (0, 0, 0, 0)}, "link_bandwidths_mb_s has 4 entries"),
        ({"link_delays_ms": (0, -3, 0)}, r"link_delays_ms\[1\] must be a finite number >= 0"),
        ({"link_bandwidths_mb_s": (0, 0, math.nan)}, r"link_bandwidths_mb_s\[2\] must be"),
        ({"link_delay_ms": math.inf}, "link_delay_ms must be a finite number >= 0"),
    ],
)
def test_session_config_refuses_bad_link_figures(links: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _config(0, **links)


def test_session_spec_carries_the_matrix_and_is_checked() -> None:
    spec = pb.SessionSpec(
        session_id="s",
        key_salt=b"salt",
        rank=2,
        endpoints=["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"],
        shard_key="k",
        compute_dtype="float32",
        link_delays_ms=[1, 30, 0],
        link_bandwidths_mb_s=[0, 1.5, 0],
    )
    request = SessionRequest.from_pb(spec, "token")
    assert request.comm.link_emulation(1) == LinkEmulation(delay_ms=30, bandwidth_bytes_per_s=1.5e6)
    del spec.link_delays_ms[:]
    spec.link_delays_ms.extend([1.0, -2.0, 0.0])
    with pytest.raises(ValueError, match=r"link_delays_ms\[1\] must be a finite number >= 0"):
        SessionRequest.from_pb(spec, "token")
    del spec.link_delays_ms[:]
    spec.link_delays_ms.append(1.0)
    with pytest.raises(ValueError, match="give one per rank"):
        SessionRequest.from_pb(spec, "token")


def _open_session(delays: list[list[float]], listeners: list[DataListener]) -> list[Communicator]:
    """Three ranks on loopback, each in a thread; delays[i][j]: the link from i to j."""
    endpoints = tuple(f"127.0.0.1:{listener.port}" for listener in listeners)
    comms: list[Communicator | None] = [None] * 3
    errors: list[BaseException] = []

    def connect(rank: int) -> None:
        config = SessionConfig(
            session_id="links",
            session_key=KEY,
            rank=rank,
            endpoints=endpoints,
            link_delays_ms=tuple(row[rank] for row in delays),
        )
        listeners[rank].expect("links", KEY)
        try:
            comms[rank] = Communicator.connect(config, listeners[rank])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=connect, args=(rank,)) for rank in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    return [comm for comm in comms if comm is not None]


def test_a_session_slows_only_the_pair_its_matrix_names() -> None:
    slow_ms = 80.0
    delays = [[0.0, 0.0, 0.0], [0.0, 0.0, slow_ms], [0.0, slow_ms, 0.0]]
    listeners = [DataListener("127.0.0.1") for _ in range(3)]
    comms = _open_session(delays, listeners)
    try:
        assert len(comms) == 3
        for rank, comm in enumerate(comms):  # every link got its own peer's figures
            for peer in range(3):
                if peer != rank:
                    expected = LinkEmulation(delay_ms=slow_ms) if {rank, peer} == {1, 2} else None
                    assert comm.link(peer).emulation == (expected or NO_EMULATION)
        for src, dst in ((1, 2), (2, 1)):
            start = time.monotonic()
            comms[src].send(torch.arange(4.0), dst)
            got = comms[dst].recv(src)
            assert time.monotonic() - start >= slow_ms / 1e3, f"{src} -> {dst} too fast"
            assert torch.equal(got, torch.arange(4.0))
        comms[0].send(torch.ones(2), 1)  # an unemulated pair still works
        assert torch.equal(comms[1].recv(0), torch.ones(2))
    finally:
        for comm in comms:
            comm.close()
        for listener in listeners:
            listener.close()
