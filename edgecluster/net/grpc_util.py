"""gRPC servers and channels that prove the cluster token, with optional TLS and limits.

`start_server` serves the Auth service next to the registered ones and refuses every
other call that does not prove the token; `open_channel` returns a channel whose
first call runs the handshake (see auth.py) and whose every call carries a MAC.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from edgecluster import PROTOCOL_VERSION
from edgecluster.net.auth import (
    EXPIRED,
    HANDSHAKE_IDLE_S,
    HEADER,
    AuthService,
    TokenAuthority,
    TokenServerInterceptor,
    call_mac,
    handshake_proof,
)
from edgecluster.net.pb import edgecluster_pb2 as pb
from edgecluster.net.pb import edgecluster_pb2_grpc as pb_grpc

# Tensor chunks are at most 1 MiB; leave room for the envelope. Larger messages are
# refused by gRPC itself before our handlers see them.
MAX_MESSAGE_BYTES = 8 << 20
_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]


@dataclass(frozen=True, kw_only=True)
class TlsFiles:
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key (or neither)")
        for path in (self.cert, self.key, self.ca):
            if path is not None and not path.is_file():
                raise ValueError(f"TLS file {path} does not exist")

    @property
    def serves_tls(self) -> bool:
        return self.cert is not None

    @property
    def dials_tls(self) -> bool:
        return self.ca is not None or self.cert is not None


def start_server(
    *,
    host: str,
    port: int,
    token: str,
    register: list,  # callables taking the server: pb2_grpc.add_XServicer_to_server partials
    tls: TlsFiles | None = None,
    max_workers: int = 16,
) -> tuple[grpc.Server, int]:
    """Starts a server that refuses calls not proving `token`; returns it and its port."""
    authority = TokenAuthority(token)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=[TokenServerInterceptor(authority)],
        options=_OPTIONS,
    )
    pb_grpc.add_AuthServicer_to_server(AuthService(authority), server)
    for add in register:
        add(server)
    address = f"{host}:{port}"
    if tls is not None and tls.serves_tls:
        assert tls.cert is not None and tls.key is not None
        creds = grpc.ssl_server_credentials(
            [(tls.key.read_bytes(), tls.cert.read_bytes())],
            root_certificates=tls.ca.read_bytes() if tls.ca else None,
            require_client_auth=False,
        )
        bound = server.add_secure_port(address, creds)
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot listen on {address}: the port is taken or the address is not local")
    server.start()
    return server, bound


def open_channel(address: str, token: str, tls: TlsFiles | None = None) -> grpc.Channel:
    """A channel whose every call proves the cluster token (the token is never sent)."""
    if tls is not None and tls.dials_tls:
        creds = grpc.ssl_channel_credentials(
            root_certificates=tls.ca.read_bytes() if tls.ca else tls.cert.read_bytes()  # type: ignore[union-attr]
        )
        channel = grpc.secure_channel(address, creds, options=_OPTIONS)
    else:
        channel = grpc.insecure_channel(address, options=_OPTIONS)
    return grpc.intercept_channel(channel, TokenClientInterceptor(channel, token, address))


class HandshakeError(grpc.RpcError):
    """The handshake could not prove the token to (or from) the peer; raised as the
    call's own error, so callers see one RpcError with a code and details."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def _not_proven(address: str) -> HandshakeError:
    return HandshakeError(
        grpc.StatusCode.UNAUTHENTICATED,
        f"authentication failed: the peer at {address} could not prove the cluster token "
        "(a fake peer, or another cluster's); nothing else was sent to it",
    )


def _too_old(address: str) -> HandshakeError:
    return HandshakeError(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"the peer at {address} has no Auth service: it speaks a protocol older than "
        f"{PROTOCOL_VERSION}; run the same edgecluster version on every node",
    )


class _Proof:
    """One channel's handshake: its id, derived key and the server's clock offset."""

    def __init__(self, hid: str, key: bytes, offset_ms: int) -> None:
        self.hid, self.key, self.offset_ms = hid, key, offset_ms
        self.last_used = time.monotonic()


class TokenClientInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.StreamUnaryClientInterceptor):
    """Runs the handshake on first use, then MACs every outgoing call."""

    def __init__(self, raw: grpc.Channel, token: str, address: str) -> None:
        self._auth = pb_grpc.AuthStub(raw)
        self._token, self._address = token, address
        self._lock = threading.Lock()
        self._proof: _Proof | None = None

    def _handshake(self, timeout: float) -> _Proof:
        try:
            challenge = self._auth.Challenge(pb.Empty(), timeout=timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:  # type: ignore[attr-defined]
                raise _too_old(self._address) from None
            raise
        offset_ms = challenge.server_time_ms - time.monotonic_ns() // 1_000_000
        hid, ns, nc = challenge.handshake_id, challenge.server_nonce, secrets.token_bytes(16)
        reply = self._auth.Prove(
            pb.AuthProveRequest(
                handshake_id=hid,
                client_nonce=nc,
                client_proof=handshake_proof(self._token, b"client", hid, ns, nc),
            ),
            timeout=timeout,
        )
        expected = handshake_proof(self._token, b"server", hid, ns, nc)
        if not secrets.compare_digest(reply.server_proof, expected):
            raise _not_proven(self._address)
        return _Proof(hid, handshake_proof(self._token, b"key", hid, ns, nc), offset_ms)

    def _metadata(self, method: str, timeout: float | None) -> tuple[_Proof, tuple[str, str]]:
        with self._lock:
            proof = self._proof
            if proof is None or time.monotonic() - proof.last_used > HANDSHAKE_IDLE_S / 2:
                proof = self._proof = self._handshake(min(timeout or 10.0, 10.0))
            proof.last_used = time.monotonic()
        nonce = secrets.token_hex(12)
        stamp = time.monotonic_ns() // 1_000_000 + proof.offset_ms
        mac = call_mac(proof.key, method, proof.hid, nonce, stamp)
        return proof, (HEADER, f"{proof.hid}.{nonce}.{stamp}.{mac}")

    def _forget_if_expired(self, proof: _Proof) -> Callable[[Any], None]:
        def check(outcome: Any) -> None:
            if outcome.code() == grpc.StatusCode.UNAVAILABLE and outcome.details() == EXPIRED:
                with self._lock:
                    if self._proof is proof:
                        self._proof = None  # the next call proves the token again

        return check

    def _call(self, continuation: Any, details: Any, request: Any) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        proof, entry = self._metadata(method, details.timeout)
        metadata = [*(details.metadata or ()), entry]
        outcome = continuation(_ClientCallDetails(details, metadata), request)
        outcome.add_done_callback(self._forget_if_expired(proof))
        return outcome

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return self._call(continuation, details, request)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iter: Any) -> Any:
        return self._call(continuation, details, request_iter)


class _ClientCallDetails(grpc.ClientCallDetails):
    def __init__(self, base: Any, metadata: list[tuple[str, str]]) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)
