"""The coordinator's HTTP API: OpenAI-compatible endpoints plus health and cluster view.

`build_app(backend=..., control=...)` returns an aiohttp application; the
coordinator runs it (see `start_api_server`). Endpoints:

    GET  /health               200 when ready (or control plane only), else 503 + state
    GET  /v1/cluster           the cluster view: members and, with a model, shards
    GET  /v1/models            OpenAI model list; the model appears once ready
    GET  /v1/models/{model}    one model, 404 otherwise
    POST /v1/chat/completions  OpenAI chat, streaming or not
    POST /v1/completions       OpenAI legacy completions, streaming or not

Every error is an OpenAI error object (`errors.py`); every request is logged
with method, path, status, tokens and seconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from edgecluster.api.backend import BackendUnavailable, ControlView, GenerationBackend
from edgecluster.api.completions import READY, USAGE_KEY, CompletionHandlers
from edgecluster.api.errors import SERVER_ERROR, ApiError, error_body, unavailable

logger = logging.getLogger(__name__)

__all__ = ["ControlView", "build_app", "start_api_server"]

DEFAULT_MAX_TOKENS = 512  # completion budget when a request sets none (context permitting)
CONTROL_ONLY_STATE = "control plane only (no model)"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def log_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One log record per request: method, path, status, tokens, seconds."""
    start = time.monotonic()
    status: int | str = "cancelled"
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        usage = request.get(USAGE_KEY)
        tokens = f"{usage.prompt_tokens}+{usage.completion_tokens}" if usage else "-"
        seconds = time.monotonic() - start
        logger.info(
            "%s %s %s tokens=%s %.3fs", request.method, request.path, status, tokens, seconds
        )


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turns every failure into an OpenAI error object; unknown routes too."""
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except BackendUnavailable as exc:
        return unavailable(str(exc)).response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = f"{exc.reason}: {request.method} {request.path}"
        code = "not_found" if exc.status == 404 else exc.reason.lower().replace(" ", "_")
        body = error_body(message, code=code)
        return web.json_response(body, status=exc.status, headers=_allow_header(exc))
    except Exception:
        logger.exception("%s %s failed", request.method, request.path)
        body = error_body("internal server error", error_type=SERVER_ERROR, code="internal_error")
        return web.json_response(body, status=500)


def _allow_header(exc: web.HTTPException) -> dict[str, str]:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else {}


class InfoHandlers:
    """Health, cluster view and model list: the endpoints that generate nothing."""

    def __init__(self, backend: GenerationBackend | None, control: ControlView) -> None:
        self._backend = backend
        self._control = control
        self._created = int(time.time())

    async def health(self, request: web.Request) -> web.Response:
        if self._backend is None:
            body = {"status": "ok", "state": CONTROL_ONLY_STATE, "control": self._control.state()}
            return web.json_response(body)
        state = self._backend.state()
        if state == READY:
            body = {"status": "ok", "state": READY, "model": self._backend.model_name}
            return web.json_response(body)
        return web.json_response({"status": "unavailable", "state": state}, status=503)

    async def cluster(self, request: web.Request) -> web.Response:
        source = self._backend if self._backend is not None else self._control
        return web.json_response(source.cluster_view())

    def _model_cards(self) -> list[dict[str, object]]:
        if self._backend is None or self._backend.state() != READY:
            return []
        card = {
            "id": self._backend.model_name,
            "object": "model",
            "created": self._created,
            "owned_by": "edgecluster",
        }
        return [card]

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": self._model_cards()})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        for card in self._model_cards():
            if card["id"] == name:
                return web.json_response(card)
        raise ApiError(
            404, f"The model '{name}' does not exist.", param="model", code="model_not_found"
        )


def build_app(
    *,
    backend: GenerationBackend | None,
    control: ControlView,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
) -> web.Application:
    """The API over a backend (None: `--model none`, control plane only)."""
    if default_max_tokens < 1:
        raise ValueError(f"default_max_tokens must be at least 1, got {default_max_tokens}")
    info = InfoHandlers(backend, control)
    completions = CompletionHandlers(backend, default_max_tokens=default_max_tokens)
    app = web.Application(middlewares=[log_requests, openai_errors])
    app.router.add_get("/health", info.health)
    app.router.add_get("/v1/cluster", info.cluster)
    app.router.add_get("/v1/models", info.models)
    app.router.add_get("/v1/models/{model}", info.model)
    app.router.add_post("/v1/chat/completions", completions.chat)
    app.router.add_post("/v1/completions", completions.completions)
    return app


async def start_api_server(app: web.Application, *, host: str, port: int) -> web.AppRunner:
    """Serves app on host:port (0: any free port; see `bound_port`). Stop with runner.cleanup().

    Handlers are cancelled when their client disconnects, so a request waiting for
    its first token is cancelled too, not only one that is streaming.
    """
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The TCP port the first site of a started runner listens on."""
    address = runner.addresses[0]
    return int(address[1])
