"""gRPC servers and channels with the cluster token, optional TLS and message limits."""

from __future__ import annotations

from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from edgecluster.net.auth import TokenClientInterceptor, TokenServerInterceptor

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
    """Starts a token-checking server; returns it and the bound port."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=[TokenServerInterceptor(token)],
        options=_OPTIONS,
    )
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
    """A channel whose every call carries the cluster token."""
    if tls is not None and tls.dials_tls:
        creds = grpc.ssl_channel_credentials(
            root_certificates=tls.ca.read_bytes() if tls.ca else tls.cert.read_bytes()  # type: ignore[union-attr]
        )
        channel = grpc.secure_channel(address, creds, options=_OPTIONS)
    else:
        channel = grpc.insecure_channel(address, options=_OPTIONS)
    return grpc.intercept_channel(channel, TokenClientInterceptor(token))
