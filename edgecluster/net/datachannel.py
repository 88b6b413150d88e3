"""The data channel: sessions' kept TCP links, opened with a mutual HMAC handshake.

gRPC costs about 1 ms per unary round trip in Python; a decode step needs dozens of
collectives, so tensors of a session travel here instead. A session is negotiated
over authenticated gRPC (id, key salt, endpoints; each member derives the session key
from the cluster token, it is never sent). Each link then proves the key with an
HMAC challenge-response in both directions (server nonce, client nonce) before any
tensor moves, and both ends derive the link's own key from the session key and both
nonces; every later frame carries a tag under it, and is sealed too where the
cluster runs TLS (link.py, frame_seal.py).

A failed proof, an unknown session or another protocol version ends that link with
an ERROR frame; the listener keeps serving others.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time

from edgecluster import PROTOCOL_VERSION
from edgecluster.errors import AuthenticationError, PeerLostError, TensorMessageError
from edgecluster.net.auth import session_proof
from edgecluster.net.frame_seal import (
    AEAD,
    MAC,
    MODE_NAMES,
    TO_CLIENT,
    TO_SERVER,
    FrameSeal,
    link_key,
)
from edgecluster.net.link import (  # re-exported: the data channel's public names
    MAX_FRAME_BYTES,
    Link,
    default_link_delay_ms,
    send_tensor_to,
    tensor_packet,
    wait_any,
)
from edgecluster.net.link_emulation import NO_EMULATION, LinkEmulation
from edgecluster.net.pb import edgecluster_pb2 as pb

__all__ = [
    "MAX_FRAME_BYTES",
    "NO_EMULATION",
    "DataListener",
    "Link",
    "LinkEmulation",
    "default_link_delay_ms",
    "dial",
    "send_tensor_to",
    "split_endpoint",
    "tensor_packet",
    "wait_any",
]

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 10.0


def _handshake_parts(
    ns: bytes, nc: bytes, session_id: str, rank: int, mode: int
) -> tuple[bytes, ...]:
    return ns, nc, session_id.encode(), str(rank).encode(), str(mode).encode()


def _proof(key: bytes, role: bytes, *parts: bytes) -> bytes:
    return session_proof(key, role, *parts)


def _mode(encrypt: bool) -> int:
    return AEAD if encrypt else MAC


def dial(
    endpoint: str,
    *,
    session_id: str,
    key: bytes,
    rank: int,
    peer: str,
    link_delay_ms: float = 0.0,
    bandwidth_bytes_per_s: float = 0.0,
    timeout_s: float = HANDSHAKE_TIMEOUT_S,
    encrypt: bool = False,
) -> Link:
    """Connects to a peer's listener, proves the session key both ways, and protects
    the link's frames from then on (MAC, or AEAD when `encrypt`). Frames from the
    peer are held as an emulated link of that delay and bandwidth would (0: none)."""
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
    link = Link(
        sock, peer, link_delay_ms=link_delay_ms, bandwidth_bytes_per_s=bandwidth_bytes_per_s
    )
    challenge = link.recv_frame()
    if challenge.kind != pb.Frame.CHALLENGE:
        raise AuthenticationError(f"{endpoint} did not send a challenge")
    mode, nc = _mode(encrypt), secrets.token_bytes(16)
    parts = _handshake_parts(challenge.nonce, nc, session_id, rank, mode)
    link.send_frame(
        pb.Frame(
            kind=pb.Frame.HELLO,
            session_id=session_id,
            rank=rank,
            nonce=nc,
            protection=mode,
            protocol_version=PROTOCOL_VERSION,
            proof=_proof(key, b"client", *parts),
        )
    )
    welcome = link.recv_frame()
    expected = _proof(key, b"server", *parts)
    if welcome.kind != pb.Frame.WELCOME or not secrets.compare_digest(welcome.proof, expected):
        link.close()
        raise AuthenticationError(f"{endpoint} failed to prove the session key")
    seal = FrameSeal(link_key(key, *parts), mode=mode, outgoing=TO_SERVER, incoming=TO_CLIENT)
    link.protect(seal)
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
        self._sessions: dict[str, tuple[bytes, float, int]] = {}
        self._ready: dict[tuple[str, int], Link] = {}
        self._cond = threading.Condition()
        self._closed = False
        threading.Thread(target=self._accept_loop, name="data-accept", daemon=True).start()

    def expect(
        self, session_id: str, key: bytes, link_delay_ms: float = 0.0, encrypt: bool = False
    ) -> None:
        """Accepts links of `session_id` proving `key`; their frames are sealed (AEAD)
        when `encrypt`, else MACed, and held `link_delay_ms` (an emulated link; the
        communicator sets each link's own emulation when it takes it)."""
        with self._cond:
            self._sessions[session_id] = (key, link_delay_ms, _mode(encrypt))

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
            key, delay_ms, parts = self._check_hello(hello, nonce, link)
        except (PeerLostError, TensorMessageError, AuthenticationError) as exc:
            log.warning("data link from %s refused: %s", peer, exc)
            link.close()
            return
        link.send_frame(pb.Frame(kind=pb.Frame.WELCOME, proof=_proof(key, b"server", *parts)))
        mode, lkey = hello.protection, link_key(key, *parts)
        link.protect(FrameSeal(lkey, mode=mode, outgoing=TO_CLIENT, incoming=TO_SERVER))
        sock.settimeout(None)
        link.emulate(LinkEmulation(delay_ms=delay_ms) if delay_ms else NO_EMULATION)
        link.peer = f"rank {hello.rank} ({peer})"
        with self._cond:
            self._ready[(hello.session_id, hello.rank)] = link
            self._cond.notify_all()

    def _check_hello(
        self, hello: pb.Frame, nonce: bytes, link: Link
    ) -> tuple[bytes, float, tuple[bytes, ...]]:
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
        key, delay_ms, mode = entry
        if hello.protection != mode:
            given = MODE_NAMES.get(hello.protection, str(hello.protection))
            raise refuse(
                f"UNAUTHENTICATED: frame protection {given} does not match the session's "
                f"{MODE_NAMES[mode]}; give every node the same --tls-* options"
            )
        if len(hello.nonce) < 16:
            raise refuse("UNAUTHENTICATED: HELLO needs a client nonce of 16 bytes or more")
        parts = _handshake_parts(nonce, hello.nonce, hello.session_id, hello.rank, mode)
        if not secrets.compare_digest(hello.proof, _proof(key, b"client", *parts)):
            raise refuse("UNAUTHENTICATED: wrong session proof")
        return key, delay_ms, parts
