"""The data channel: kept TCP links carrying length-prefixed frames.

gRPC costs about 1 ms per unary round trip in Python; a decode step needs dozens of
collectives, so tensors of a session travel here instead. A session is negotiated
over authenticated gRPC (id, per-session key, endpoints); each link then proves the
key with an HMAC challenge-response in both directions before any tensor moves.

Frames: a 4-byte little-endian length, then that many bytes whose first is the type:
- CONTROL (0): a serialized protobuf `Frame` (handshake, ERROR, BYE);
- TENSOR (1): a raw tensor header (dtype code, dims, send time; see codec), followed
  by the tensor's numel * itemsize bytes, which the length does not count. They are
  read straight into the new tensor's memory once the header has been checked.
Raw tensor frames cost a third of a protobuf message per tensor (no message to build,
serialize, parse or copy out of), and a decode step sends hundreds of them.

A frame over the limit, a bad tensor header or a failed proof ends that link with an
ERROR frame; the listener keeps serving others. A rank that loses a peer tells the
rest with an ERROR frame naming the lost rank (`Link.report_lost`), so nobody waits
forever.

An optional per-link delay (`link_delay_ms`, default from EDGE_LINK_DELAY_MS)
emulates a slow link: the receiver holds each frame until `sent_at + delay`, so the
sender is never blocked, as on a real link. Same-machine only (monotonic clock).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import select
import socket
import struct
import threading
import time
from collections.abc import Sequence
from typing import NoReturn

import torch

from edgecluster import PROTOCOL_VERSION
from edgecluster.errors import AuthenticationError, PeerLostError, TensorMessageError
from edgecluster.net.auth import session_proof
from edgecluster.net.codec import (
    DEFAULT_LIMITS,
    TensorLimits,
    parse_raw_header,
    raw_header,
    tensor_bytes,
)
from edgecluster.net.pb import edgecluster_pb2 as pb
from edgecluster.net.polling_reader import SocketReader, default_spin_us, env_amount

log = logging.getLogger(__name__)

_LEN = struct.Struct("<I")
_CONTROL, _TENSOR = b"\x00", b"\x01"  # frame types (the first byte after the length)
MAX_FRAME_BYTES = 64 << 10  # a control frame or a tensor header (a tensor's bytes follow)
_COALESCE_BYTES = 64 << 10  # tensors up to this size go out as one write with their header
HANDSHAKE_TIMEOUT_S = 10.0
REPORT_TIMEOUT_S = 1.0
_LOST_PREFIX = "PEER_LOST "  # ERROR frame: "PEER_LOST <name>\n<detail>", a lost rank


def default_link_delay_ms() -> float:
    value = env_amount("EDGE_LINK_DELAY_MS", "milliseconds")
    return 0.0 if value is None else value


class Link:
    """One authenticated TCP stream to a peer rank. Not thread-safe per direction."""

    def __init__(
        self,
        sock: socket.socket,
        peer: str,
        *,
        link_delay_ms: float = 0.0,
        limits: TensorLimits = DEFAULT_LIMITS,
        spin_us: float | None = None,
    ) -> None:
        spin_us = default_spin_us() if spin_us is None else spin_us
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.peer = peer
        self._reader = SocketReader(sock, int(spin_us * 1000))
        self._delay_ns = int(link_delay_ms * 1e6)
        self._limits = limits
        self._send_lock = threading.Lock()

    # -- frames --
    def send_frame(self, frame: pb.Frame) -> None:
        self.send_packet(_packet(frame))

    def send_packet(self, *parts: bytes | memoryview) -> None:
        """Writes pieces of encoded frames in order, with no other frame between them
        (a fan-out encodes once and sends the same pieces on every link)."""
        try:
            with self._send_lock:
                for part in parts:
                    self.sock.sendall(part)
        except OSError as exc:
            raise PeerLostError(self.peer, f"send failed ({exc})") from exc

    def recv_frame(self) -> pb.Frame:
        """The next control frame (an ERROR frame raises what it reports)."""
        message = self._recv_message()
        if isinstance(message, torch.Tensor):
            self._refuse(f"expected a control frame, got a tensor {list(message.shape)}")
        return message

    def _recv_message(self) -> pb.Frame | torch.Tensor:
        head = self._read(4)
        if len(head) < 4:
            raise PeerLostError(self.peer, "connection closed")
        (size,) = _LEN.unpack(head)
        if size > MAX_FRAME_BYTES:  # refused outside _read: its TensorMessageError must surface
            self._refuse(f"frame of {size} bytes exceeds the limit {MAX_FRAME_BYTES}")
        body = self._read(size)
        if len(body) < size:
            raise PeerLostError(self.peer, "connection closed mid-frame")
        kind = body[:1]
        if kind == _TENSOR:
            return self._recv_tensor_payload(memoryview(body)[1:])
        if kind != _CONTROL:
            self._refuse(f"undecodable frame (type {kind.hex() or 'missing'})")
        frame = pb.Frame()
        try:
            frame.ParseFromString(body[1:])
        except Exception as exc:  # protobuf raises DecodeError, a plain Exception subclass
            self._refuse(f"undecodable frame ({exc})")
        if frame.kind == pb.Frame.ERROR:
            raise _reported_error(self.peer, frame.message)
        self._hold_until(frame.sent_at_ns)
        return frame

    def _recv_tensor_payload(self, header: memoryview) -> torch.Tensor:
        try:
            dtype, shape, sent_at_ns = parse_raw_header(header, self._limits)
        except TensorMessageError as exc:
            self._refuse(str(exc))
        tensor = torch.empty(shape, dtype=dtype)
        if tensor.numel():
            into = tensor.view(-1).view(torch.uint8).numpy().data
            try:
                filled = self._reader.read_into(into)
            except (OSError, ValueError) as exc:
                raise PeerLostError(self.peer, f"receive failed ({exc})") from exc
            if filled < len(into):
                raise PeerLostError(self.peer, "connection closed mid-tensor")
        self._hold_until(sent_at_ns)
        return tensor

    def _hold_until(self, sent_at_ns: int) -> None:
        """Emulated link delay: a frame is readable `link_delay_ms` after it was sent."""
        if self._delay_ns:
            wait_ns = sent_at_ns + self._delay_ns - time.monotonic_ns()
            if wait_ns > 0:
                time.sleep(wait_ns / 1e9)

    def _read(self, size: int) -> bytes:
        try:
            return self._reader.read(size)
        except (OSError, ValueError) as exc:  # ValueError: read on a closed file
            raise PeerLostError(self.peer, f"receive failed ({exc})") from exc

    @property
    def buffered(self) -> bool:
        """Whether bytes of a frame already wait in the receive buffer."""
        return self._reader.buffered

    @property
    def spin_ns(self) -> int:
        """How long a read polls before it blocks."""
        return self._reader.spin_ns

    def _refuse(self, message: str) -> NoReturn:
        """Tells the peer what was wrong (INVALID_ARGUMENT), closes, raises."""
        with contextlib.suppress(PeerLostError):
            self.send_frame(pb.Frame(kind=pb.Frame.ERROR, message=f"INVALID_ARGUMENT: {message}"))
        self.close()
        raise TensorMessageError(f"from {self.peer}: {message}")

    # -- tensors --
    def send_tensor(self, t: torch.Tensor) -> None:
        send_tensor_to([self], t)

    def recv_tensor(self) -> torch.Tensor:
        message = self._recv_message()
        if isinstance(message, torch.Tensor):
            return message
        if message.kind == pb.Frame.BYE:
            raise PeerLostError(self.peer, "peer ended the session")
        self._refuse(f"expected a tensor, got a control frame of kind {message.kind}")

    def report_lost(self, lost: PeerLostError) -> None:
        """Best effort: tells this peer which rank was lost, then closes the link.

        Never waits on a sender thread or on a full socket for long: the point is that
        no rank is left waiting for a frame that will not come.
        """
        if self._send_lock.acquire(blocking=False):
            detail = str(lost).removeprefix(f"lost agent {lost.peer}: ")
            frame = pb.Frame(kind=pb.Frame.ERROR, message=f"{_LOST_PREFIX}{lost.peer}\n{detail}")
            try:
                self.sock.settimeout(REPORT_TIMEOUT_S)
                self.sock.sendall(_packet(frame))
            except OSError:
                pass  # that peer is gone too; closing is all that is left
            finally:
                self._send_lock.release()
        self.close()

    def settimeout(self, seconds: float | None) -> None:
        self.sock.settimeout(seconds)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def wait_any(links: Sequence[Link], spin_ns: int) -> list[Link]:
    """The links a frame can be read from now; waits (polls for up to `spin_ns`, then
    blocks) until there is at least one. One poll covers every socket."""
    ready = [link for link in links if link.buffered]
    if ready:
        return ready
    poller = select.poll()
    for link in links:
        poller.register(link.sock, select.POLLIN)
    deadline = time.monotonic_ns() + spin_ns
    while True:
        events = poller.poll(0 if time.monotonic_ns() < deadline else None)
        if events:
            fds = {fd for fd, _ in events}
            return [link for link in links if link.sock.fileno() in fds]
        os.sched_yield()


def _packet(frame: pb.Frame) -> bytes:
    """A control frame, stamped with the send time, serialized and length-prefixed."""
    frame.sent_at_ns = time.monotonic_ns()
    body = frame.SerializeToString()
    return _LEN.pack(1 + len(body)) + _CONTROL + body


def tensor_packet(t: torch.Tensor) -> tuple[bytes, memoryview]:
    """A tensor frame: its length-prefixed header, and the bytes that follow it."""
    t = t.detach().contiguous()
    header = raw_header(t, time.monotonic_ns())
    return _LEN.pack(1 + len(header)) + _TENSOR + header, tensor_bytes(t)


def send_tensor_to(links: Sequence[Link], t: torch.Tensor) -> None:
    """Sends `t` on every link in turn, encoded once (the hub's fan-out). A small
    tensor goes out with its header in one write; a large one is not copied."""
    head, payload = tensor_packet(t)
    parts: tuple[bytes | memoryview, ...] = (head, payload)
    if len(payload) <= _COALESCE_BYTES:
        parts = (head + payload,)
    for link in links:
        link.send_packet(*parts)


def _reported_error(via: str, message: str) -> PeerLostError:
    """The error an ERROR frame stands for: a lost rank's name travels as its own."""
    if message.startswith(_LOST_PREFIX):
        lost, _, detail = message.removeprefix(_LOST_PREFIX).partition("\n")
        return PeerLostError(lost, f"{detail} (reported by {via})")
    return PeerLostError(via, f"peer reported: {message}")


# ---------------------------------------------------------------- handshake


def _proof(key: bytes, nonce: bytes, session_id: str, rank: int, role: bytes) -> bytes:
    return session_proof(key, role, nonce, session_id.encode(), str(rank).encode())


def dial(
    endpoint: str,
    *,
    session_id: str,
    key: bytes,
    rank: int,
    peer: str,
    link_delay_ms: float = 0.0,
    timeout_s: float = HANDSHAKE_TIMEOUT_S,
) -> Link:
    """Connects to a peer's listener and proves the session key, both ways."""
    host, port = split_endpoint(endpoint)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=timeout_s)
            break
        except OSError as exc:
            if time.monotonic() > deadline:
                raise PeerLostError(peer, f"cannot connect to {endpoint} ({exc})") from exc
            time.sleep(0.05)
    link = Link(sock, peer, link_delay_ms=link_delay_ms)
    challenge = link.recv_frame()
    if challenge.kind != pb.Frame.CHALLENGE:
        raise AuthenticationError(f"{endpoint} did not send a challenge")
    link.send_frame(
        pb.Frame(
            kind=pb.Frame.HELLO,
            session_id=session_id,
            rank=rank,
            protocol_version=PROTOCOL_VERSION,
            proof=_proof(key, challenge.nonce, session_id, rank, b"client"),
        )
    )
    welcome = link.recv_frame()
    expected = _proof(key, challenge.nonce, session_id, rank, b"server")
    if welcome.kind != pb.Frame.WELCOME or not secrets.compare_digest(welcome.proof, expected):
        link.close()
        raise AuthenticationError(f"{endpoint} failed to prove the session key")
    sock.settimeout(None)
    return link


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"endpoint {endpoint!r} is not host:port")
    return host.strip("[]"), int(port)


class DataListener:
    """Accepts data-channel links for registered sessions and hands them out by rank."""

    def __init__(self, host: str, port: int = 0) -> None:
        self._server = socket.create_server((host, port), reuse_port=False, backlog=64)
        self.port: int = self._server.getsockname()[1]
        self._sessions: dict[str, tuple[bytes, float]] = {}
        self._ready: dict[tuple[str, int], Link] = {}
        self._cond = threading.Condition()
        self._closed = False
        threading.Thread(target=self._accept_loop, name="data-accept", daemon=True).start()

    def expect(self, session_id: str, key: bytes, link_delay_ms: float = 0.0) -> None:
        with self._cond:
            self._sessions[session_id] = (key, link_delay_ms)

    def forget(self, session_id: str) -> None:
        with self._cond:
            self._sessions.pop(session_id, None)
            for k in [k for k in self._ready if k[0] == session_id]:
                self._ready.pop(k).close()

    def take(self, session_id: str, rank: int, timeout_s: float) -> Link:
        """The link that rank `rank` of the session opened to us."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while (session_id, rank) not in self._ready:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    raise PeerLostError(f"rank {rank}", "did not connect to the data channel")
                self._cond.wait(remaining)
            return self._ready.pop((session_id, rank))

    def close(self) -> None:
        self._closed = True
        self._server.close()
        with self._cond:
            for link in self._ready.values():
                link.close()
            self._ready.clear()
            self._cond.notify_all()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                sock, addr = self._server.accept()
            except OSError:
                return
            threading.Thread(
                target=self._handshake, args=(sock, f"{addr[0]}:{addr[1]}"), daemon=True
            ).start()

    def _handshake(self, sock: socket.socket, peer: str) -> None:
        sock.settimeout(HANDSHAKE_TIMEOUT_S)
        link = Link(sock, peer)
        try:
            nonce = secrets.token_bytes(16)
            link.send_frame(pb.Frame(kind=pb.Frame.CHALLENGE, nonce=nonce))
            hello = link.recv_frame()
            key, delay_ms = self._check_hello(hello, nonce, link)
        except (PeerLostError, TensorMessageError, AuthenticationError) as exc:
            log.warning("data link from %s refused: %s", peer, exc)
            link.close()
            return
        link.send_frame(
            pb.Frame(
                kind=pb.Frame.WELCOME,
                proof=_proof(key, nonce, hello.session_id, hello.rank, b"server"),
            )
        )
        sock.settimeout(None)
        link._delay_ns = int(delay_ms * 1e6)
        link.peer = f"rank {hello.rank} ({peer})"
        with self._cond:
            self._ready[(hello.session_id, hello.rank)] = link
            self._cond.notify_all()

    def _check_hello(self, hello: pb.Frame, nonce: bytes, link: Link) -> tuple[bytes, float]:
        def refuse(message: str) -> AuthenticationError:
            link.send_frame(pb.Frame(kind=pb.Frame.ERROR, message=message))
            return AuthenticationError(message)

        if hello.kind != pb.Frame.HELLO:
            raise refuse("expected HELLO")
        if hello.protocol_version != PROTOCOL_VERSION:
            raise refuse(
                f"UNAUTHENTICATED: protocol version {hello.protocol_version} does not match "
                f"this node's {PROTOCOL_VERSION}"
            )
        with self._cond:
            entry = self._sessions.get(hello.session_id)
        if entry is None:
            raise refuse(f"UNAUTHENTICATED: unknown session {hello.session_id!r}")
        key, delay_ms = entry
        expected = _proof(key, nonce, hello.session_id, hello.rank, b"client")
        if not secrets.compare_digest(hello.proof, expected):
            raise refuse("UNAUTHENTICATED: wrong session proof")
        return key, delay_ms
