"""What the HTTP API enforces: its key, browser origins, body size, deadline, reply budget.

`ApiOptions` is built once (by the coordinator, from `CoordinatorConfig`) and handed
to `build_app`. The defaults are a loopback API with no key and no CORS.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgecluster.config import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_REQUEST_TIMEOUT_S,
    check_api_key,
    check_cors_origins,
)

DEFAULT_MAX_TOKENS = 512  # completion budget when a request sets none (context permitting)


@dataclass(frozen=True, kw_only=True)
class ApiOptions:
    api_key: str | None = None  # None: /v1/* takes requests without a key
    cors_origins: tuple[str, ...] = ()  # () : no CORS headers; "*": any origin
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    default_max_tokens: int = DEFAULT_MAX_TOKENS

    def __post_init__(self) -> None:
        check_api_key(self.api_key)
        check_cors_origins(self.cors_origins)
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be positive, got {self.max_body_bytes}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be positive, got {self.request_timeout_s}")
        if self.default_max_tokens < 1:
            raise ValueError(
                f"default_max_tokens must be at least 1, got {self.default_max_tokens}"
            )
