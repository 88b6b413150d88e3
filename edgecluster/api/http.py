"""The coordinator's HTTP API: OpenAI-compatible endpoints plus health and cluster view.

`build_app(backend=..., control=...)` returns an aiohttp application; the
coordinator runs it (see `start_api_server`). Endpoints:

    GET  /health               200 when ready (or control plane only), else 503 + state
    GET  /v1/cluster           the cluster view: members and, with a model, shards
    GET  /v1/models            OpenAI model list; the model appears once ready
    GET  /v1/models/{model}    one model, 404 otherwise
    POST /v1/chat/completions  OpenAI chat, streaming or not
    POST /v1/completions       OpenAI legacy completions, streaming or not

Every error is an OpenAI error object (`errors.py`); every response carries
`X-Request-Id`, and every request is logged with method, path, status, tokens,
seconds and that id. `ApiOptions` adds an API key on /v1/* (`access.py`), CORS,
a body-size limit (413) and a per-request deadline (504); a backend that is busy
answers 429 with `Retry-After`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from edgecluster.api.access import CorsPolicy, require_api_key
from edgecluster.api.backend import BackendBusy, BackendUnavailable, ControlView, GenerationBackend
from edgecluster.api.completions import READY, USAGE_KEY, CompletionHandlers
from edgecluster.api.errors import (
    SERVER_ERROR,
    ApiError,
    busy,
    error_body,
    payload_too_large,
    unavailable,
)
from edgecluster.api.options import ApiOptions
from edgecluster.api.request_ids import (
    add_request_id_header,
    assign_request_ids,
    current_request_id,
)

logger = logging.getLogger(__name__)

__all__ = ["ApiOptions", "ControlView", "build_app", "start_api_server"]

OPTIONS_KEY = web.AppKey("edgecluster_api_options", ApiOptions)
CONTROL_ONLY_STATE = "control plane only (no model)"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def log_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One log record per request: method, path, status, tokens, seconds, request id."""
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
            "%s %s %s tokens=%s %.3fs id=%s",
            request.method, request.path, status, tokens, seconds, current_request_id(),
        )  # fmt: skip


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turns every failure into an OpenAI error object; unknown routes too."""
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except BackendUnavailable as exc:
        return unavailable(str(exc)).response()
    except BackendBusy as exc:
        return busy(str(exc), exc.retry_after_s).response()
    except web.HTTPRequestEntityTooLarge:
        return payload_too_large(request.app[OPTIONS_KEY].max_body_bytes).response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = f"{exc.reason}: {request.method} {request.path}"
        code = "not_found" if exc.status == 404 else exc.reason.lower().replace(" ", "_")
        body = error_body(message, code=code)
        return web.json_response(body, status=exc.status, headers=_allow_header(exc))
    except Exception:
        logger.exception("%s %s failed (id=%s)", request.method, request.path, current_request_id())
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


def _middlewares(options: ApiOptions, cors: CorsPolicy | None) -> list[Middleware]:
    """Outermost first: name the request, log it, shape errors, then CORS and the key."""
    chain: list[Middleware] = [assign_request_ids, log_requests, openai_errors]
    if cors is not None:
        chain.append(cors.middleware())
    if options.api_key is not None:
        chain.append(require_api_key(options.api_key))
    return chain


def build_app(
    *,
    backend: GenerationBackend | None,
    control: ControlView,
    options: ApiOptions | None = None,
    training: Callable[[], dict[str, Any]] | None = None,
) -> web.Application:
    """The API over a backend (None: `--model none`, control plane only); `training`
    is the view of the training run `GET /v1/training` shows (None: no run here)."""
    options = options or ApiOptions()
    info = InfoHandlers(backend, control)
    completions = CompletionHandlers(backend, options)
    cors = CorsPolicy(options.cors_origins) if options.cors_origins else None
    app = web.Application(
        middlewares=_middlewares(options, cors), client_max_size=options.max_body_bytes
    )
    app[OPTIONS_KEY] = options
    app.on_response_prepare.append(add_request_id_header)
    if cors is not None:
        app.on_response_prepare.append(cors.add_headers)

    async def close_handlers(_: web.Application) -> None:
        await completions.close()

    app.on_cleanup.append(close_handlers)
    app.router.add_get("/health", info.health)
    app.router.add_get("/v1/cluster", info.cluster)
    app.router.add_get("/v1/models", info.models)
    app.router.add_get("/v1/models/{model}", info.model)
    app.router.add_post("/v1/chat/completions", completions.chat)
    app.router.add_post("/v1/completions", completions.completions)

    async def training_view(_: web.Request) -> web.Response:
        if training is None:
            return ApiError(
                404, "no training run on this coordinator (start one with edge-coordinator train)",
                code="no_training",
            ).response()  # fmt: skip
        return web.json_response(training())

    app.router.add_get("/v1/training", training_view)
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
