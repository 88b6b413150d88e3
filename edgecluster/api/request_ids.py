"""Request ids: every response carries `X-Request-Id`, every log line of a request names it.

A client's own id is echoed when it is sane (printable ASCII without spaces, at most
128 characters); otherwise, or when none is sent, one is generated. Handlers and the
code they call read it with `current_request_id()` (a contextvar set per request).
"""

from __future__ import annotations

import contextvars
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web

HEADER = "X-Request-Id"
MAX_LENGTH = 128
REQUEST_ID_KEY = web.RequestKey("edgecluster_request_id", str)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_current: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def current_request_id() -> str:
    """The id of the request being handled ('-' outside a request)."""
    return _current.get()


def is_sane(value: str) -> bool:
    return 0 < len(value) <= MAX_LENGTH and all(0x20 < ord(c) < 0x7F for c in value)


def _request_id(request: web.Request) -> str:
    given = request.headers.get(HEADER, "")
    return given if is_sane(given) else uuid.uuid4().hex


@web.middleware
async def assign_request_ids(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost middleware: names the request before anything logs about it."""
    request_id = _request_id(request)
    request[REQUEST_ID_KEY] = request_id
    token = _current.set(request_id)
    try:
        return await handler(request)
    finally:
        _current.reset(token)


async def add_request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: runs before the headers leave, streams included."""
    request_id = request.get(REQUEST_ID_KEY)
    if request_id is not None:
        response.headers[HEADER] = request_id
