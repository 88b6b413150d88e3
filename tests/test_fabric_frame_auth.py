"""Data-channel frames are authenticated (and, with encrypt, sealed) per link.

Two real endpoints (`dial` and a DataListener) talk through an on-path relay on
127.0.0.1 that can flip a byte, inject a frame or replay one. Every such frame is
refused: the link ends with an error naming the peer, the sender is told, and the
listener keeps serving a good link.
"""

from __future__ import annotations

import secrets
import socket
import struct
import threading
from collections.abc import Iterator

import pytest
import torch

from edgecluster.errors import PeerLostError
from edgecluster.net.datachannel import DataListener, Link, dial, tensor_packet

SESSION = "frames"
KEY = secrets.token_bytes(32)
HEAD = 4 + 1 + 10 + 8  # length, type, dtype/ndim/sent_at, one dim


class Relay:
    """Forwards one connection both ways; records and can tamper with client -> server."""

    def __init__(self, target_port: int) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._target = target_port
        self.upstream = bytearray()  # every byte the client sent, as it sent them
        self.flip_at: int | None = None  # absolute offset in the upstream to corrupt
        self._to_server: socket.socket | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        client, _ = self._server.accept()
        server = socket.create_connection(("127.0.0.1", self._target))
        self._to_server = server
        self._ready.set()
        threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()
        self._pump(client, server, True)

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        while True:
            try:
                data = bytearray(src.recv(1 << 16))
            except OSError:
                data = bytearray()
            if not data:
                for s in (src, dst):
                    s.close()
                return
            if upstream:
                start = len(self.upstream)
                if self.flip_at is not None and start <= self.flip_at < start + len(data):
                    data[self.flip_at - start] ^= 0x40
                self.upstream += data
            try:
                dst.sendall(data)
            except OSError:
                return

    def inject(self, data: bytes) -> None:
        self._ready.wait(5)
        assert self._to_server is not None
        self._to_server.sendall(data)

    def close(self) -> None:
        self._server.close()


@pytest.fixture(params=[False, True], ids=["mac", "aead"])
def encrypt(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def listener(encrypt: bool) -> Iterator[DataListener]:
    server = DataListener("127.0.0.1")
    server.expect(SESSION, KEY, encrypt=encrypt)
    yield server
    server.close()


@pytest.fixture
def relayed(listener: DataListener, encrypt: bool) -> Iterator[tuple[Relay, Link, Link]]:
    relay = Relay(listener.port)
    client = dial(
        f"127.0.0.1:{relay.port}",
        session_id=SESSION, key=KEY, rank=1, peer="hub", timeout_s=5, encrypt=encrypt,
    )  # fmt: skip
    server = listener.take(SESSION, 1, timeout_s=5)
    yield relay, client, server
    client.close()
    server.close()
    relay.close()


def _good_link_still_served(listener: DataListener, encrypt: bool) -> None:
    client = dial(
        f"127.0.0.1:{listener.port}",
        session_id=SESSION, key=KEY, rank=2, peer="hub", timeout_s=5, encrypt=encrypt,
    )  # fmt: skip
    server = listener.take(SESSION, 2, timeout_s=5)
    try:
        for _ in range(3):
            sent = torch.randn(4, 5)
            client.send_tensor(sent)
            assert torch.equal(server.recv_tensor(), sent)
            server.send_tensor(sent * 2)
            assert torch.equal(client.recv_tensor(), sent * 2)
    finally:
        client.close()
        server.close()


def _assert_refused(server: Link, client: Link) -> None:
    with pytest.raises(PeerLostError, match="failed authentication: tampered or injected") as err:
        server.recv_tensor()
    assert server.peer in str(err.value)  # the error names the peer
    with pytest.raises(PeerLostError, match="UNAUTHENTICATED"):  # the sender is told why
        client.recv_tensor()


@pytest.mark.parametrize("where", ["payload", "sent-time", "tag"])
def test_a_flipped_byte_ends_the_link(
    listener: DataListener, relayed: tuple[Relay, Link, Link], encrypt: bool, where: str
) -> None:
    relay, client, server = relayed
    client.send_tensor(torch.ones(64))  # a good frame first: the link works
    assert torch.equal(server.recv_tensor(), torch.ones(64))
    offset = {"payload": HEAD + 100, "sent-time": 4 + 1 + 2 + 3, "tag": HEAD + 256 + 5}[where]
    relay.flip_at = len(relay.upstream) + offset
    client.send_tensor(torch.arange(64, dtype=torch.float32))
    _assert_refused(server, client)
    _good_link_still_served(listener, encrypt)


def test_an_injected_frame_ends_the_link(
    listener: DataListener, relayed: tuple[Relay, Link, Link], encrypt: bool
) -> None:
    relay, client, server = relayed
    head, payload = tensor_packet(torch.full((8,), 7.0))  # well formed, but no key
    relay.inject(head + bytes(payload) + secrets.token_bytes(16))
    _assert_refused(server, client)
    _good_link_still_served(listener, encrypt)


def test_a_replayed_frame_ends_the_link(
    listener: DataListener, relayed: tuple[Relay, Link, Link], encrypt: bool
) -> None:
    relay, client, server = relayed
    start = len(relay.upstream)
    client.send_tensor(torch.full((16,), 3.0))
    assert torch.equal(server.recv_tensor(), torch.full((16,), 3.0))
    frame = bytes(relay.upstream[start:])
    assert len(frame) == HEAD + 64 + 16
    relay.inject(frame)  # byte for byte what the client sent: its sequence number is spent
    _assert_refused(server, client)
    _good_link_still_served(listener, encrypt)


def test_only_sealed_links_hide_their_payload(
    relayed: tuple[Relay, Link, Link], encrypt: bool
) -> None:
    relay, client, server = relayed
    secret = torch.tensor([1.25, -9.5, 3.0, 1e6])
    client.send_tensor(secret)
    assert torch.equal(server.recv_tensor(), secret)
    in_clear = struct.pack("<4f", *secret.tolist()) in relay.upstream
    assert in_clear is not encrypt  # MAC: authentic but readable; AEAD: sealed
