"""OpenAI-style error objects: `{"error": {message, type, param, code}}`.

Handlers raise `ApiError`; the error middleware in `http.py` turns it into a JSON
response. Nothing here knows about generation.
"""

from __future__ import annotations

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
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(
            self.message, error_type=self.error_type, param=self.param, code=self.code
        )

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status)


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> ApiError:
    """400 invalid_request_error; `code` defaults to 'invalid_value'."""
    return ApiError(400, message, param=param, code=code or "invalid_value")


def unavailable(message: str, *, code: str = "backend_unavailable") -> ApiError:
    """503: the model cannot serve now (not loaded yet, agents lost, ...)."""
    return ApiError(503, message, error_type=SERVER_ERROR, code=code)
