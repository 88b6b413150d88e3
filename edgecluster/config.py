"""Configuration of the two processes, validated once, frozen."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from edgecluster.net.grpc_util import TlsFiles

DEFAULT_GRPC_PORT = 50050
DEFAULT_HTTP_PORT = 8000
DTYPES = ("float32", "bfloat16")
DEFAULT_MAX_BODY_BYTES = 2 << 20  # a 2 MiB JSON body holds ~250k token ids
DEFAULT_MAX_QUEUE = 64  # requests waiting for a place in the running batch
DEFAULT_REQUEST_TIMEOUT_S = 600.0


def cache_root() -> Path:
    """Where edgecluster keeps models and agent data: $EDGE_CACHE_DIR or ~/.cache/edgecluster."""
    if os.environ.get("EDGE_CACHE_DIR"):
        return Path(os.environ["EDGE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgecluster"


def _check_port(name: str, port: int) -> None:
    if not 0 <= port <= 65535:
        raise ValueError(f"{name} must be between 0 and 65535, got {port}")


def is_loopback_host(host: str) -> bool:
    """True when `host` (an address or 'localhost') is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_api_key(key: str | None) -> None:
    """An HTTP API key must fit an `Authorization: Bearer KEY` header."""
    if key is None:
        return
    if not key or not all(0x20 < ord(c) < 0x7F for c in key):
        raise ValueError(
            "--api-key must be non-empty printable ASCII without spaces "
            "(clients send it as 'Authorization: Bearer KEY')"
        )


def check_cors_origins(origins: tuple[str, ...]) -> None:
    """Each entry is '*' or an origin such as https://app.example.com:8080 (no path)."""
    for origin in origins:
        if origin == "*":
            continue
        scheme, sep, rest = origin.partition("://")
        if scheme not in ("http", "https") or not sep or not rest or "/" in rest:
            raise ValueError(
                f"--cors-origins entry {origin!r} must be '*' or an origin such as "
                "https://app.example.com or http://localhost:3000 (scheme and host, no path)"
            )


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    token: str
    name: str
    coordinator: str | None = None  # host:port; None: find it over mDNS
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port
    data_port: int = 0
    data_dir: Path
    memory_limit_bytes: int = 0  # 0: no limit promised
    cache_limit_bytes: int = 20 << 30  # shard cache on disk; older unused shards pruned beyond
    mdns: bool = True
    threads: int = 0  # torch threads; 0: from the cores this process may use
    window_blocks: int = 0  # 0: chosen automatically when streaming
    heartbeat_interval_s: float = 0.5
    tls: TlsFiles = field(default_factory=TlsFiles)

    def __post_init__(self) -> None:
        if not self.token:
            raise ValueError("an agent needs the cluster token: pass --token or set EDGE_TOKEN")
        if not self.name or len(self.name) > 63:
            raise ValueError("--name must be 1 to 63 characters")
        _check_port("--port", self.port)
        if self.coordinator is not None and ":" not in self.coordinator:
            raise ValueError(f"coordinator {self.coordinator!r} must be host:port (grpc port)")
        if self.cache_limit_bytes < 0:
            raise ValueError(f"--cache-limit must not be negative, got {self.cache_limit_bytes}")
        if self.memory_limit_bytes < 0 or self.threads < 0 or self.window_blocks < 0:
            raise ValueError("--memory-limit, --threads and --window must not be negative")
        if self.window_blocks == 1:
            raise ValueError("--window must be at least 2 (one block computing, one loading)")


@dataclass(frozen=True, kw_only=True)
class CoordinatorConfig:
    token: str
    model: str = "none"
    host: str = "127.0.0.1"  # gRPC and data channel
    http_host: str = "127.0.0.1"  # the HTTP API, independently of `host`
    http_port: int = DEFAULT_HTTP_PORT
    grpc_port: int = DEFAULT_GRPC_PORT
    data_port: int = 0
    peers: tuple[str, ...] = ()
    mdns: bool = True
    local_agents: int = 0
    min_agents: int = 1
    dtype: str | None = None  # compute dtype; None: bfloat16 for bf16 weights, else float32
    weights: str | None = None  # fp32 | bf16 | int8 | int4; None: what the checkpoint holds
    storage_dtype: str | None = None  # older spelling of weights fp32 | bf16
    max_context: int = 2048
    kv_dtype: str | None = None  # None: same as dtype
    kv_budget_tokens: int = 0  # KV positions held at once over all requests; 0: auto
    memory_limit_bytes: int = 0
    link_delay_ms: float = 0.0
    # emulated links per pair (--cluster FILE: its links, by agent name; the coordinator
    # is "coordinator"); None: link_delay_ms on every link, unlimited bandwidth
    cluster_file: str | None = None
    heartbeat_timeout_s: float = 2.5
    tls: TlsFiles = field(default_factory=TlsFiles)
    cache_dir: Path = field(default_factory=cache_root)
    api_key: str | None = None  # None: the HTTP API takes requests without a key
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API; "*": any
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_queue: int = DEFAULT_MAX_QUEUE
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S

    def __post_init__(self) -> None:
        if not self.token:
            raise ValueError("the coordinator needs a token (one is generated when omitted)")
        self._check_http()
        _check_port("--port", self.http_port)
        _check_port("--grpc-port", self.grpc_port)
        if self.local_agents < 0 or self.min_agents < 1:
            raise ValueError("--local must be >= 0 and --min-agents >= 1")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.storage_dtype is not None and self.storage_dtype not in DTYPES:
            raise ValueError(f"--storage-dtype must be one of {DTYPES}")
        from edgecluster.weights.weight_mode import check_weights_flags  # imports torch

        check_weights_flags(self.weights, self.dtype, self.storage_dtype)
        if self.max_context < 16:
            raise ValueError("--max-context must be at least 16 tokens")
        if self.kv_dtype is not None and self.kv_dtype not in DTYPES:
            raise ValueError(f"--kv-dtype must be one of {DTYPES}, got {self.kv_dtype!r}")
        if self.kv_budget_tokens < 0 or 0 < self.kv_budget_tokens < 16:
            raise ValueError(
                f"--kv-budget must be at least 16 tokens (or 0: automatic), got "
                f"{self.kv_budget_tokens}"
            )
        for peer in self.peers:
            if ":" not in peer:
                raise ValueError(f"--peers entry {peer!r} must be host:port (an agent's grpc port)")
        if self.cluster_file is not None:
            from edgecluster.plan.cluster_file import load_links

            load_links(self.cluster_file)  # a ValueError naming the file and the problem

    def _check_http(self) -> None:
        if not self.http_host:
            raise ValueError("--http-host must be an address, e.g. 127.0.0.1 or 0.0.0.0")
        check_api_key(self.api_key)
        check_cors_origins(self.cors_origins)
        if self.max_body_bytes < 1024:
            raise ValueError(f"--max-body must be at least 1KiB, got {self.max_body_bytes} bytes")
        if self.max_queue < 1:
            raise ValueError(f"--max-queue must be at least 1 request, got {self.max_queue}")
        if not 0 < self.request_timeout_s <= 86400:
            raise ValueError(
                f"--request-timeout must be between 0 and 86400 seconds, got "
                f"{self.request_timeout_s}"
            )
