"""OpenAI-style error objects: `{"error": {message, type, param, code}}`.

Handlers raise `ApiError`; the error middleware in `http.py` turns it into a JSON
response. Nothing here knows about generation.
"""

from __future__ import annotations

import math
from typing import Any

from aiohttp import web

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"


def error_body(
    message: str,
    *,
    error_type: str = INVALID_REQUEST,
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """The JSON body OpenAI clients parse for errors (also sent as an SSE event)."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


class ApiError(Exception):
    """A request the API answers with an error status and an OpenAI error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(
            self.message, error_type=self.error_type, param=self.param, code=self.code
        )

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> ApiError:
    """400 invalid_request_error; `code` defaults to 'invalid_value'."""
    return ApiError(400, message, param=param, code=code or "invalid_value")


def unavailable(message: str, *, code: str = "backend_unavailable") -> ApiError:
    """503: the model cannot serve now (not loaded yet, agents lost, ...)."""
    return ApiError(503, message, error_type=SERVER_ERROR, code=code)


def busy(message: str, retry_after_s: float) -> ApiError:
    """429: the server is up but cannot take this request now; retry after a while."""
    seconds = max(1, math.ceil(retry_after_s))  # Retry-After takes whole seconds
    return ApiError(
        429,
        f"{message} (retry after {seconds} s)",
        error_type=SERVER_ERROR,
        code="server_busy",
        headers={"Retry-After": str(seconds)},
    )


def deadline_exceeded(timeout_s: float) -> ApiError:
    """504: the request ran past --request-timeout; its generation was cancelled."""
    return ApiError(
        504,
        f"the request did not finish within its deadline of {timeout_s:g} s and was "
        "cancelled; ask for fewer tokens, or raise the coordinator's --request-timeout",
        error_type=SERVER_ERROR,
        code="timeout",
    )


def payload_too_large(limit_bytes: int) -> ApiError:
    """413: the body is over --max-body."""
    return ApiError(
        413,
        f"the request body is larger than this server's limit of {limit_bytes} bytes; send "
        "a shorter prompt, or raise the coordinator's --max-body",
        code="request_too_large",
    )


def shorten(value: object, limit: int = 80) -> str:
    """repr(value) cut to about `limit` characters, for echoing client input in messages."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
