"""Cluster token: every RPC carries it or is refused with UNAUTHENTICATED.

The token travels in the `authorization` metadata as `Bearer <token>` and is
compared in constant time. Data-channel links prove a per-session key with HMAC.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from typing import Any

import grpc

_HEADER = "authorization"


def generate_token() -> str:
    """A random URL-safe token that never starts with '-' (it would read as a flag)."""
    while (token := secrets.token_urlsafe(24)).startswith("-"):
        pass
    return token


def tokens_match(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def session_proof(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"|".join(parts), hashlib.sha256).digest()


class TokenServerInterceptor(grpc.ServerInterceptor):
    """Refuses any call whose metadata lacks the cluster token."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("a cluster token is required")
        self._token = token

        def refuse(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "authentication failed: wrong or missing cluster token; pass the token the "
                "coordinator printed with --token or EDGE_TOKEN",
            )

        self._refuse_unary = grpc.unary_unary_rpc_method_handler(refuse)
        self._refuse_stream = grpc.stream_unary_rpc_method_handler(refuse)

    def intercept_service(
        self, continuation: Callable[[Any], Any], handler_call_details: Any
    ) -> Any:
        given = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == _HEADER and isinstance(value, str) and value.startswith("Bearer "):
                given = value[len("Bearer ") :]
        if tokens_match(given, self._token):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is not None and handler.request_streaming:
            return self._refuse_stream
        return self._refuse_unary


class _ClientCallDetails(grpc.ClientCallDetails):
    def __init__(self, base: Any, metadata: list[tuple[str, str]]) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


class TokenClientInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.StreamUnaryClientInterceptor):
    """Adds the cluster token to every outgoing call."""

    def __init__(self, token: str) -> None:
        self._entry = (_HEADER, f"Bearer {token}")

    def _details(self, details: Any) -> _ClientCallDetails:
        return _ClientCallDetails(details, [*(details.metadata or ()), self._entry])

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iter: Any) -> Any:
        return continuation(self._details(details), request_iter)
