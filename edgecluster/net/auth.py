"""Cluster token: every RPC proves knowledge of it; the token itself never travels.

Per channel, the client runs a challenge-response over the `Auth` service (the only
calls served without proof):

    Challenge()                        -> handshake id, server nonce, server clock
    Prove(id, client nonce, HMAC(token, "client"|id|ns|nc))
                                       -> HMAC(token, "server"|id|ns|nc)

The server checks the client's proof and answers with its own, which the client
checks: a server that does not know the token (a spoofed mDNS advertisement, a fake
peer named in an invite) is refused before it is sent anything but a proof it
cannot use. Both sides derive k = HMAC(token, "key"|id|ns|nc). Every later call on
the channel carries `x-edge-auth: id.nonce.time_ms.HMAC(k, method|id|nonce|time)`;
the server checks the MAC in constant time, refuses times outside a window (in its
own clock, so peers need no clock sync) and nonces it has seen (a bounded cache per
handshake), and forgets handshakes left idle. The bodies of calls are not covered:
without TLS an on-path host can still rewrite them, but learns nothing reusable.

Session keys are derived on each side (`derive_session_key`), never sent; the data
channel proves them with HMAC per link (datachannel.py).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from edgecluster.net.pb import edgecluster_pb2 as pb
from edgecluster.net.pb import edgecluster_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

HEADER = "x-edge-auth"
AUTH_SERVICE_PREFIX = "/edgecluster.v1.Auth/"
CALL_WINDOW_MS = 30_000  # a call's time stamp may differ this much from the server's clock
HANDSHAKE_IDLE_S = 600.0  # a server forgets a handshake unused this long
PENDING_TTL_S = 30.0  # a challenge not proven within this is dropped
MAX_PENDING = 1024  # unproven challenges kept (Challenge is served to anyone)
MAX_HANDSHAKES = 4096
MAX_NONCES = 4096  # per handshake, within the call window
REFUSED = (
    "authentication failed: wrong or missing cluster token; pass the token the "
    "coordinator printed with --token or EDGE_TOKEN"
)
EXPIRED = "authentication handshake unknown or expired (the peer restarted?); retry"


def generate_token() -> str:
    """A random URL-safe token that never starts with '-' (it would read as a flag)."""
    while (token := secrets.token_urlsafe(24)).startswith("-"):
        pass
    return token


def tokens_match(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def session_proof(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"|".join(parts), hashlib.sha256).digest()


def derive_session_key(token: str, session_id: str, salt: bytes) -> bytes:
    """The data channel's key for a session, computed by every member from the token."""
    return session_proof(token.encode(), b"session", session_id.encode(), salt)


def _handshake_parts(hid: str, server_nonce: bytes, client_nonce: bytes) -> tuple[bytes, ...]:
    return hid.encode(), server_nonce, client_nonce


def handshake_proof(token: str, role: bytes, hid: str, ns: bytes, nc: bytes) -> bytes:
    return session_proof(token.encode(), role, *_handshake_parts(hid, ns, nc))


def call_mac(key: bytes, method: str, hid: str, nonce: str, time_ms: int) -> str:
    message = f"{method}|{hid}|{nonce}|{time_ms}".encode()
    return hmac.digest(key, message, "sha256").hex()


# ------------------------------------------------------------------ server side


@dataclass
class _Handshake:
    key: bytes
    last_used: float
    seen: OrderedDict[str, int] = field(default_factory=OrderedDict)
    horizon_ms: int = -(1 << 62)  # calls stamped at or before this are refused

    def admit(self, nonce: str, time_ms: int, now_ms: int) -> str | None:
        """None when the call is fresh, else why it is refused."""
        if abs(time_ms - now_ms) > CALL_WINDOW_MS or time_ms <= self.horizon_ms:
            return f"stale call time ({(now_ms - time_ms) / 1000:+.1f} s from the server's)"
        if nonce in self.seen:
            return "replayed call (nonce already used)"
        self.seen[nonce] = time_ms
        while self.seen:
            oldest, stamped = next(iter(self.seen.items()))
            if len(self.seen) > MAX_NONCES:
                self.horizon_ms = max(self.horizon_ms, stamped)
            elif stamped >= now_ms - CALL_WINDOW_MS:
                break
            del self.seen[oldest]
        return None


def _now_ms() -> int:
    return time.monotonic_ns() // 1_000_000


class TokenAuthority:
    """The server's side: serves challenges, checks proofs, remembers handshakes."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("a cluster token is required")
        self._token = token
        self._lock = threading.Lock()
        self._pending: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._proven: OrderedDict[str, _Handshake] = OrderedDict()

    def challenge(self) -> pb.AuthChallengeReply:
        hid, nonce, now = secrets.token_hex(12), secrets.token_bytes(16), time.monotonic()
        with self._lock:
            self._pending[hid] = (nonce, now)
            while self._pending and (
                len(self._pending) > MAX_PENDING
                or next(iter(self._pending.values()))[1] < now - PENDING_TTL_S
            ):
                self._pending.popitem(last=False)
        return pb.AuthChallengeReply(handshake_id=hid, server_nonce=nonce, server_time_ms=_now_ms())

    def prove(self, request: pb.AuthProveRequest) -> bytes | None:
        """The server's proof, or None when the client's proof is wrong."""
        hid, nc = request.handshake_id, request.client_nonce
        with self._lock:
            pending = self._pending.pop(hid, None)
        if pending is None or len(nc) < 16:
            return None
        ns = pending[0]
        expected = handshake_proof(self._token, b"client", hid, ns, nc)
        if not hmac.compare_digest(request.client_proof, expected):
            return None
        key = handshake_proof(self._token, b"key", hid, ns, nc)
        now = time.monotonic()
        with self._lock:
            self._proven[hid] = _Handshake(key=key, last_used=now)
            self._expire(now)
        return handshake_proof(self._token, b"server", hid, ns, nc)

    def _expire(self, now: float) -> None:
        stale = [h for h, s in self._proven.items() if s.last_used < now - HANDSHAKE_IDLE_S]
        for hid in stale:
            del self._proven[hid]
        while len(self._proven) > MAX_HANDSHAKES:
            self._proven.popitem(last=False)

    def check_call(self, method: str, value: str) -> tuple[grpc.StatusCode, str] | None:
        """None when `value` (the x-edge-auth metadata) authorizes a call of `method`."""
        try:
            hid, nonce, stamp, mac = value.split(".")
            time_ms = int(stamp)
        except ValueError:
            return grpc.StatusCode.UNAUTHENTICATED, REFUSED
        with self._lock:
            shake = self._proven.get(hid)
            if shake is None:
                return grpc.StatusCode.UNAVAILABLE, EXPIRED
            if not hmac.compare_digest(mac, call_mac(shake.key, method, hid, nonce, time_ms)):
                return grpc.StatusCode.UNAUTHENTICATED, REFUSED
            why = shake.admit(nonce, time_ms, _now_ms())
            if why is not None:
                return grpc.StatusCode.UNAUTHENTICATED, f"authentication failed: {why}"
            shake.last_used = time.monotonic()
            self._proven.move_to_end(hid)
        return None


class AuthService(pb_grpc.AuthServicer):
    def __init__(self, authority: TokenAuthority) -> None:
        self._authority = authority

    def Challenge(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.AuthChallengeReply:
        return self._authority.challenge()

    def Prove(self, request: pb.AuthProveRequest, context: grpc.ServicerContext) -> Any:
        proof = self._authority.prove(request)
        if proof is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSED)
        return pb.AuthProveReply(server_proof=proof)


class TokenServerInterceptor(grpc.ServerInterceptor):
    """Refuses any call (but the Auth service's) that does not prove the token."""

    def __init__(self, authority: TokenAuthority | str) -> None:
        if isinstance(authority, str):
            authority = TokenAuthority(authority)
        self.authority = authority

    def intercept_service(
        self, continuation: Callable[[Any], Any], handler_call_details: Any
    ) -> Any:
        method = handler_call_details.method
        if method.startswith(AUTH_SERVICE_PREFIX):
            return continuation(handler_call_details)
        given = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == HEADER and isinstance(value, str):
                given = value
        refusal = self.authority.check_call(method, given)
        if refusal is None:
            return continuation(handler_call_details)
        code, message = refusal
        if code == grpc.StatusCode.UNAUTHENTICATED:
            log.warning("refused a call to %s: %s", method, message)

        def refuse(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(code, message)

        handler = continuation(handler_call_details)
        if handler is not None and handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(refuse)
        return grpc.unary_unary_rpc_method_handler(refuse)
