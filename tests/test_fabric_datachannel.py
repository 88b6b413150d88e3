"""The data channel's framing and handshake against raw sockets on 127.0.0.1.

A real DataListener serves; the test plays a misbehaving client byte by byte: every bad
frame ends that link with an ERROR frame that says why, and the listener keeps
accepting correct clients.
"""

from __future__ import annotations

import secrets
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from edgecluster import PROTOCOL_VERSION
from edgecluster.errors import (
    AuthenticationError,
    EdgeClusterError,
    PeerLostError,
    TensorMessageError,
)
from edgecluster.net.auth import session_proof
from edgecluster.net.codec import DTYPE_CODES, parse_raw_header
from edgecluster.net.datachannel import (
    MAX_FRAME_BYTES,
    DataListener,
    Link,
    dial,
    tensor_packet,
    wait_any,
)
from edgecluster.net.frame_seal import MAC, TO_CLIENT, TO_SERVER, FrameSeal, link_key
from edgecluster.net.pb import edgecluster_pb2 as pb
from edgecluster.net.polling_reader import default_spin_us

SESSION = "sess-1"
KEY = secrets.token_bytes(32)
_LEN = struct.Struct("<I")
CONTROL, TENSOR = 0, 1  # the frame type byte after the length


@pytest.fixture
def listener() -> Iterator[DataListener]:
    server = DataListener("127.0.0.1")
    server.expect(SESSION, KEY)
    yield server
    server.close()


CLIENT_NONCE = b"c" * 16


def _parts(nonce: bytes, rank: int, session: str = SESSION) -> tuple[bytes, ...]:
    return nonce, CLIENT_NONCE, session.encode(), str(rank).encode(), str(MAC).encode()


def _proof(nonce: bytes, rank: int, role: bytes, key: bytes = KEY, session: str = SESSION) -> bytes:
    return session_proof(key, role, *_parts(nonce, rank, session))


class RawClient:
    """A client that writes whatever bytes the test wants."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.seal: FrameSeal | None = None  # the link's keys, once welcomed

    def welcomed(self, nonce: bytes, rank: int = 1) -> None:
        """Reads the WELCOME and from then on tags what it sends like a real peer."""
        welcome = self.read_frame()
        assert welcome is not None and welcome.kind == pb.Frame.WELCOME, welcome
        key = link_key(KEY, *_parts(nonce, rank))
        self.seal = FrameSeal(key, mode=MAC, outgoing=TO_SERVER, incoming=TO_CLIENT)

    def send_tagged(self, head: bytes, payload: bytes = b"", tensor: bool = False) -> None:
        """A frame whose length and type are in `head`, with a valid tag."""
        assert self.seal is not None
        if tensor:
            sent, tag = self.seal.seal_tensor(head, memoryview(payload))
            self.sock.sendall(head + bytes(sent) + tag)
        else:
            self.sock.sendall(head[:5] + self.seal.seal_control(head[:5], head[5:]))

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frame(self, frame: pb.Frame) -> None:
        self.sock.sendall(_control(frame))

    def read_message(self) -> tuple[int, bytes] | None:
        """(frame type, the bytes after it), or None once the server closed."""
        head = self._read_exactly(4)
        if head is None:
            return None
        body = self._read_exactly(_LEN.unpack(head)[0])
        assert body is not None and body, "connection closed mid-frame"
        return body[0], body[1:]

    def read_frame(self) -> pb.Frame | None:
        """The next control frame, or None once the server closed the connection."""
        message = self.read_message()
        if message is None:
            return None
        kind, body = message
        assert kind == CONTROL, f"expected a control frame, got type {kind}"
        frame = pb.Frame()
        frame.ParseFromString(body)
        return frame

    def challenge(self) -> bytes:
        frame = self.read_frame()
        assert frame is not None and frame.kind == pb.Frame.CHALLENGE and len(frame.nonce) >= 16
        return frame.nonce

    def hello(self, nonce: bytes, rank: int = 1, **overrides: object) -> None:
        fields = {
            "kind": pb.Frame.HELLO,
            "session_id": SESSION,
            "rank": rank,
            "nonce": CLIENT_NONCE,
            "protection": MAC,
            "protocol_version": PROTOCOL_VERSION,
            "proof": _proof(nonce, rank, b"client"),
            **overrides,
        }
        self.send_frame(pb.Frame(**fields))  # type: ignore[arg-type]

    def expect_error_then_close(self, *fragments: str) -> str:
        frame = self.read_frame()
        if self.seal is not None and frame is not None:  # a tagged frame: tag follows
            self._read_exactly(16)
        assert frame is not None and frame.kind == pb.Frame.ERROR, frame
        for fragment in fragments:
            assert fragment in frame.message, frame.message
        assert self.read_frame() is None, "the server must close the link after an ERROR frame"
        return frame.message

    def close(self) -> None:
        self.sock.close()

    def read_exactly(self, size: int) -> bytes | None:
        return self._read_exactly(size)

    def _read_exactly(self, size: int) -> bytes | None:
        data = b""
        while len(data) < size:
            piece = self.sock.recv(size - len(data))
            if not piece:
                return None
            data += piece
        return data


def _dial_and_take(listener: DataListener, rank: int = 1) -> tuple[Link, Link]:
    """A correct client link and the listener's side of it."""
    client = dial(
        f"127.0.0.1:{listener.port}",
        session_id=SESSION,
        key=KEY,
        rank=rank,
        peer="hub",
        timeout_s=5,
    )
    return client, listener.take(SESSION, rank, timeout_s=5)


def _assert_still_accepting(listener: DataListener) -> None:
    client, server = _dial_and_take(listener, rank=7)
    try:
        sent = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
        client.send_tensor(sent)
        assert torch.equal(server.recv_tensor(), sent)
        server.send_tensor(sent * 2)
        assert torch.equal(client.recv_tensor(), sent * 2)
    finally:
        client.close()
        server.close()


def _oversized(c: RawClient, nonce: bytes) -> None:
    c.send_bytes(_LEN.pack(MAX_FRAME_BYTES + 1))


def _garbage(c: RawClient, nonce: bytes) -> None:
    c.send_bytes(_LEN.pack(8) + b"\xff" * 8)  # field 31 with wire type 7: not protobuf


def _wrong_proof(c: RawClient, nonce: bytes) -> None:
    c.hello(nonce, proof=_proof(nonce, 1, b"client", key=b"k" * 32))


def _proof_for_another_rank(c: RawClient, nonce: bytes) -> None:
    c.hello(nonce, rank=2, proof=_proof(nonce, 1, b"client"))


def _replayed_server_proof(c: RawClient, nonce: bytes) -> None:
    c.hello(nonce, proof=_proof(nonce, 1, b"server"))


def _unknown_session(c: RawClient, nonce: bytes) -> None:
    c.hello(nonce, session_id="nope", proof=_proof(nonce, 1, b"client", session="nope"))


def _other_protocol(c: RawClient, nonce: bytes) -> None:
    c.hello(nonce, protocol_version=PROTOCOL_VERSION + 1)


def _tensor_before_hello(c: RawClient, nonce: bytes) -> None:
    c.send_bytes(_tensor_packet(torch.ones(2)))


BAD_HANDSHAKES = {
    "oversized-frame": (_oversized, ["INVALID_ARGUMENT", f"exceeds the limit {MAX_FRAME_BYTES}"]),
    "garbage-bytes": (_garbage, ["INVALID_ARGUMENT", "undecodable frame"]),
    "wrong-session-proof": (_wrong_proof, ["UNAUTHENTICATED", "wrong session proof"]),
    "proof-for-another-rank": (_proof_for_another_rank, ["wrong session proof"]),
    "server-proof-replayed": (_replayed_server_proof, ["wrong session proof"]),
    "unknown-session": (_unknown_session, ["UNAUTHENTICATED", "unknown session 'nope'"]),
    "other-protocol-version": (
        _other_protocol,
        [f"protocol version {PROTOCOL_VERSION + 1}", f"this node's {PROTOCOL_VERSION}"],
    ),
    "tensor-before-hello": (_tensor_before_hello, ["expected a control frame, got a tensor"]),
}


@pytest.mark.parametrize("case", sorted(BAD_HANDSHAKES))
def test_a_bad_handshake_gets_an_error_frame_and_the_listener_keeps_accepting(
    listener: DataListener, case: str
) -> None:
    misbehave, fragments = BAD_HANDSHAKES[case]
    client = RawClient(listener.port)
    try:
        misbehave(client, client.challenge())
        client.expect_error_then_close(*fragments)
    finally:
        client.close()
    with pytest.raises(EdgeClusterError, match="did not connect"):
        listener.take(SESSION, 1, timeout_s=0.2)  # nothing was handed out
    _assert_still_accepting(listener)


def test_a_correct_raw_handshake_is_welcomed_with_the_servers_proof(listener: DataListener) -> None:
    client = RawClient(listener.port)
    try:
        nonce = client.challenge()
        client.hello(nonce, rank=3)
        welcome = client.read_frame()
        assert welcome is not None and welcome.kind == pb.Frame.WELCOME
        assert welcome.proof == _proof(nonce, 3, b"server")  # the server knows the key too
        link = listener.take(SESSION, 3, timeout_s=5)
        link.send_tensor(torch.tensor([1.5, -2.0]))
        message = client.read_message()
        assert message is not None and message[0] == TENSOR
        dtype, shape, _ = parse_raw_header(message[1])
        assert (dtype, shape) == (torch.float32, [2])
        assert client.read_exactly(8) == struct.pack("<2f", 1.5, -2.0)  # the bytes follow
        tag = client.read_exactly(16)  # then the frame's tag, under the link's own key
        head = struct.pack("<I", 1 + len(message[1])) + bytes([TENSOR]) + message[1]
        key = link_key(KEY, *_parts(nonce, 3))
        opener = FrameSeal(key, mode=MAC, outgoing=TO_SERVER, incoming=TO_CLIENT)
        opener.open_tensor(head, memoryview(bytearray(struct.pack("<2f", 1.5, -2.0))), tag)
        link.close()
    finally:
        client.close()


def test_nonces_are_fresh_per_connection(listener: DataListener) -> None:
    clients = [RawClient(listener.port) for _ in range(3)]
    try:
        assert len({c.challenge() for c in clients}) == 3
    finally:
        for c in clients:
            c.close()


def test_a_silent_client_does_not_hold_up_others(listener: DataListener) -> None:
    idle = RawClient(listener.port)  # connects, never says hello
    try:
        _assert_still_accepting(listener)
    finally:
        idle.close()


def _control(frame: pb.Frame) -> bytes:
    body = bytes([CONTROL]) + frame.SerializeToString()
    return _LEN.pack(len(body)) + body


def _raw_tensor(code: int, dims: list[int], ndim: int | None = None, payload: bytes = b"") -> bytes:
    """A tensor frame as a peer could write it: any dtype code, dims and ndim claim."""
    ndim = len(dims) if ndim is None else ndim
    header = struct.pack("<BBq", code, ndim, time.monotonic_ns()) + struct.pack(
        f"<{len(dims)}q", *dims
    )
    return _LEN.pack(1 + len(header)) + bytes([TENSOR]) + header + payload


FLOAT32 = DTYPE_CODES.index("float32")

BAD_FRAMES = {
    "oversized": (
        _LEN.pack(MAX_FRAME_BYTES + 1),
        ["INVALID_ARGUMENT", f"exceeds the limit {MAX_FRAME_BYTES}"],
    ),
    "garbage": (_LEN.pack(4) + b"\xff" * 4, ["INVALID_ARGUMENT", "undecodable frame", "type ff"]),
    "garbage-control": (
        _LEN.pack(5) + bytes([CONTROL]) + b"\xff" * 4,
        ["INVALID_ARGUMENT", "undecodable frame"],
    ),
    "unknown-dtype": (
        _raw_tensor(len(DTYPE_CODES), [2], payload=bytes(16)),
        ["INVALID_ARGUMENT", f"unknown dtype code {len(DTYPE_CODES)}"],
    ),
    "dims-missing": (
        _raw_tensor(FLOAT32, [2, 3], ndim=3, payload=bytes(24)),
        ["INVALID_ARGUMENT", "does not hold the 3 dims it declares"],
    ),
    "negative-dim": (
        _raw_tensor(FLOAT32, [2, -3]),
        ["INVALID_ARGUMENT", "negative dimension in shape", "-3"],
    ),
    "too-many-elements": (
        _raw_tensor(FLOAT32, [1 << 20, 1 << 20]),
        ["INVALID_ARGUMENT", "over the limit"],
    ),
    "not-a-tensor": (
        _control(pb.Frame(kind=pb.Frame.HELLO)),
        ["expected a tensor, got a control frame"],
    ),
}


TAGGED = {"garbage-control", "not-a-tensor"}


@pytest.mark.parametrize("case", sorted(BAD_FRAMES))
def test_bad_frames_on_an_open_link_end_it_with_a_reason(listener: DataListener, case: str) -> None:
    frame_bytes, fragments = BAD_FRAMES[case]
    client = RawClient(listener.port)
    try:
        nonce = client.challenge()
        client.hello(nonce)
        client.welcomed(nonce)
        server = listener.take(SESSION, 1, timeout_s=5)
        if case in TAGGED:  # control frames are parsed only once their tag checks out
            client.send_tagged(frame_bytes)
        else:  # refused at the length, type or tensor header, before any tag
            client.send_bytes(frame_bytes)
        with pytest.raises(TensorMessageError, match=fragments[-1]):
            server.recv_tensor()
        client.expect_error_then_close(*fragments)
    finally:
        client.close()
    _assert_still_accepting(listener)


def test_dialing_with_the_wrong_key_is_refused(listener: DataListener) -> None:
    with pytest.raises(EdgeClusterError, match="wrong session proof"):
        dial(
            f"127.0.0.1:{listener.port}",
            session_id=SESSION,
            key=b"x" * 32,
            rank=1,
            peer="hub",
            timeout_s=5,
        )
    _assert_still_accepting(listener)


def test_a_server_that_cannot_prove_the_key_is_refused_by_the_client() -> None:
    """Mutual authentication: an impostor listener that welcomes anyone is not trusted."""
    with socket.create_server(("127.0.0.1", 0)) as impostor:
        port = impostor.getsockname()[1]

        def serve_once() -> None:
            conn, _ = impostor.accept()
            with conn:
                link = Link(conn, "client")
                link.send_frame(pb.Frame(kind=pb.Frame.CHALLENGE, nonce=secrets.token_bytes(16)))
                link.recv_frame()
                link.send_frame(pb.Frame(kind=pb.Frame.WELCOME, proof=b"\0" * 32))
                conn.recv(1)  # hold the connection until the client hangs up

        thread = threading.Thread(target=serve_once, daemon=True)
        thread.start()
        with pytest.raises(AuthenticationError, match="failed to prove the session key"):
            dial(f"127.0.0.1:{port}", session_id=SESSION, key=KEY, rank=1, peer="x", timeout_s=5)
        thread.join(5)


def test_a_forgotten_session_refuses_new_links(listener: DataListener) -> None:
    listener.forget(SESSION)
    client = RawClient(listener.port)
    try:
        client.hello(client.challenge())
        client.expect_error_then_close("unknown session 'sess-1'")
    finally:
        client.close()


@pytest.fixture
def link_pairs() -> Iterator[list[tuple[socket.socket, Link]]]:
    """Three (raw sending socket, receiving Link) pairs over 127.0.0.1 TCP."""
    pairs: list[tuple[socket.socket, Link]] = []
    with socket.create_server(("127.0.0.1", 0)) as server:
        for i in range(3):
            sender = socket.create_connection(server.getsockname(), timeout=5)
            conn, _ = server.accept()
            pairs.append((sender, Link(conn, f"peer {i}", spin_us=200.0 * i)))
    yield pairs
    for sender, link in pairs:
        sender.close()
        link.close()


def _tensor_packet(t: torch.Tensor) -> bytes:
    head, payload = tensor_packet(t)
    return head + payload


def test_reads_that_poll_or_block_get_the_same_tensors_from_split_writes(
    link_pairs: list[tuple[socket.socket, Link]],
) -> None:
    """A frame written in pieces, slowly, arrives whole whether the read polls first
    (spin 200 and 400 us) or blocks at once (spin 0)."""
    tensors = [torch.randn(3, 576), torch.arange(10, dtype=torch.int64), torch.randn(1, 1)]
    for sender, link in link_pairs:
        data = b"".join(_tensor_packet(t) for t in tensors)

        def write_slowly(sender: socket.socket = sender, data: bytes = data) -> None:
            for offset in range(0, len(data), 997):
                sender.sendall(data[offset : offset + 997])
                time.sleep(0.001)

        writer = threading.Thread(target=write_slowly, daemon=True)
        writer.start()
        for expected in tensors:
            got = link.recv_tensor()
            assert got.dtype == expected.dtype and torch.equal(got, expected), link.peer
        writer.join(5)


def test_wait_any_returns_only_links_with_a_frame(
    link_pairs: list[tuple[socket.socket, Link]],
) -> None:
    links = [link for _, link in link_pairs]
    (_, _), (second_sender, second), (third_sender, third) = link_pairs
    second_sender.sendall(_tensor_packet(torch.ones(2)))
    assert wait_any(links, spin_ns=0) == [second]
    assert torch.equal(second.recv_tensor(), torch.ones(2))

    later = threading.Timer(0.05, third_sender.sendall, args=(_tensor_packet(torch.zeros(3)),))
    later.start()
    started = time.monotonic()
    assert wait_any(links, spin_ns=100_000) == [third]  # polls 0.1 ms, then blocks
    assert time.monotonic() - started >= 0.04
    assert torch.equal(third.recv_tensor(), torch.zeros(3))


def test_a_closed_peer_wakes_wait_any_and_reads_as_lost(
    link_pairs: list[tuple[socket.socket, Link]],
) -> None:
    (first_sender, first), *_ = link_pairs
    first_sender.close()
    assert wait_any([link for _, link in link_pairs], spin_ns=0) == [first]
    with pytest.raises(EdgeClusterError, match="peer 0"):
        first.recv_tensor()


def test_a_bad_spin_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_SPIN_US", "fast")
    with pytest.raises(ValueError, match="EDGE_SPIN_US='fast'"):
        default_spin_us()
    monkeypatch.setenv("EDGE_SPIN_US", "-1")
    with pytest.raises(ValueError, match="must be >= 0"):
        default_spin_us()
    monkeypatch.setenv("EDGE_SPIN_US", "0")
    assert default_spin_us() == 0.0


def test_tensors_of_every_dtype_and_size_arrive_whole(listener: DataListener) -> None:
    """Small tensors go out in one write with their header, large ones (a 2048-token
    prefill) without a copy; the receiver reads each into a fresh tensor."""
    client, server = _dial_and_take(listener)
    tensors = [
        torch.randn(2048, 576),
        torch.randn(3, 5).to(torch.bfloat16),
        torch.tensor(7),
        torch.empty(0, 4),
        torch.arange(12).reshape(3, 4).t(),  # not contiguous
        torch.randn(1, 576).half(),
    ]
    sender = threading.Thread(target=lambda: [client.send_tensor(t) for t in tensors])
    sender.start()
    try:
        for expected in tensors:
            got = server.recv_tensor()
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert torch.equal(got, expected)
    finally:
        sender.join(5)
        client.close()
        server.close()


def test_a_peer_that_closes_mid_tensor_reads_as_lost(
    link_pairs: list[tuple[socket.socket, Link]],
) -> None:
    (sender, link), *_ = link_pairs
    head, payload = tensor_packet(torch.randn(100))
    sender.sendall(head + payload[:200])  # 200 of the 400 bytes the header promises
    sender.close()
    with pytest.raises(PeerLostError, match="closed mid-tensor"):
        link.recv_tensor()
