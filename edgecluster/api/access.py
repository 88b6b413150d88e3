"""Who may call the API: the API key on /v1/*, and browser origins (CORS).

`require_api_key(key)` answers every `/v1/*` request without `Authorization: Bearer
KEY` with 401 (OpenAI's `invalid_api_key`); the key is compared in constant time and
never echoed. `/health` stays open so probes need no secret.

`cors(origins)` answers preflights (OPTIONS with `Access-Control-Request-Method`)
from allowed origins with 204 and the allowed methods and headers, before the key
is checked (browsers send no credentials in a preflight), allowing the request
headers the preflight asks for; `add_headers` marks every other response to an
allowed origin. Without origins there is no CORS at all.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from edgecluster.api.errors import ApiError
from edgecluster.api.request_ids import HEADER as REQUEST_ID_HEADER

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PROTECTED_PREFIX = "/v1/"
ALLOW_METHODS = "GET, POST, OPTIONS"
ALLOW_HEADERS = f"Authorization, Content-Type, {REQUEST_ID_HEADER}"
PREFLIGHT_MAX_AGE_S = 600
_HEADER_LIST = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*")


def _bearer(request: web.Request) -> str | None:
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip()


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def require_api_key(api_key: str) -> Middleware:
    """Middleware: /v1/* needs `Authorization: Bearer api_key`."""
    expected = api_key.encode()

    @web.middleware
    async def check_api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(PROTECTED_PREFIX) or request.path == "/v1":
            given = _bearer(request)
            if given is None:
                raise _unauthorized(
                    "You didn't provide an API key. Send the key the coordinator printed (or "
                    "was given with --api-key / EDGE_API_KEY) as 'Authorization: Bearer KEY'."
                )
            if not hmac.compare_digest(given.encode(errors="surrogateescape"), expected):
                raise _unauthorized(
                    "Incorrect API key provided. Use the key the coordinator printed or was "
                    "given with --api-key / EDGE_API_KEY."
                )
        return await handler(request)

    return check_api_key


class CorsPolicy:
    """The origins allowed to call the API from a browser ('*': any)."""

    def __init__(self, origins: tuple[str, ...]) -> None:
        self._any = "*" in origins
        self._origins = frozenset(origins)

    def allowed(self, origin: str | None) -> str | None:
        """The Access-Control-Allow-Origin value for `origin`, or None when not allowed."""
        if origin is None:
            return None
        if self._any:
            return "*"
        return origin if origin in self._origins else None

    def middleware(self) -> Middleware:
        @web.middleware
        async def preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
            is_preflight = request.method == "OPTIONS" and (
                "Access-Control-Request-Method" in request.headers
            )
            origin = request.headers.get("Origin")
            if not is_preflight or origin is None:
                return await handler(request)
            allow = self.allowed(origin)
            if allow is None:
                raise ApiError(
                    403,
                    f"origin {origin[:200]!r} is not allowed to call this API; add it to the "
                    "coordinator's --cors-origins",
                    code="origin_not_allowed",
                )
            requested = request.headers.get("Access-Control-Request-Headers", "")
            return web.Response(status=204, headers=self._preflight_headers(allow, requested))

        return preflight

    @staticmethod
    def _preflight_headers(allow: str, requested: str) -> dict[str, str]:
        # An allowed origin may send what it asks for (OpenAI's browser client adds its
        # own x-stainless-* headers); a malformed list gets the standard set.
        sane = 0 < len(requested) <= 2000 and _HEADER_LIST.fullmatch(requested) is not None
        return {
            "Access-Control-Allow-Origin": allow,
            "Access-Control-Allow-Methods": ALLOW_METHODS,
            "Access-Control-Allow-Headers": requested if sane else ALLOW_HEADERS,
            "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S),
            "Vary": "Origin",
        }

    async def add_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        """on_response_prepare: lets an allowed origin read the response (and its id)."""
        if "Access-Control-Allow-Origin" in response.headers:
            return  # a preflight answer already has them
        if not self._any:
            response.headers.add("Vary", "Origin")  # the answer depends on the origin
        allow = self.allowed(request.headers.get("Origin"))
        if allow is not None:
            response.headers["Access-Control-Allow-Origin"] = allow
            response.headers["Access-Control-Expose-Headers"] = REQUEST_ID_HEADER
