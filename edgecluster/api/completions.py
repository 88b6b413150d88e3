"""POST /v1/chat/completions and /v1/completions: validate, tokenize, generate, answer.

Order of checks: JSON and fields (400), model name (404), backend readiness (503),
prompt length against the context (400); only then does generation start. A
streaming request waits for its first token before sending headers, so a backend
that fails at once still gets a plain 503; later failures become an SSE error
event. Client disconnects close the generation, which cancels the backend request.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from edgecluster.api.backend import BackendUnavailable, GenerationBackend
from edgecluster.api.errors import SERVER_ERROR, ApiError, bad_request, error_body, unavailable
from edgecluster.api.generation import TextGeneration
from edgecluster.api.openai_responses import ResponseShaper, Usage
from edgecluster.api.openai_schema import (
    CompletionRequest,
    parse_chat_request,
    parse_completion_request,
    resolve_max_tokens,
)
from edgecluster.api.sse import open_event_stream, send_done, send_event

logger = logging.getLogger(__name__)

READY = "ready"
USAGE_KEY = web.RequestKey("edgecluster_usage", Usage)
CLIENT_CLOSED_STATUS = 499  # nginx's convention; only ever seen in the request log


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying why not."""
    raw = await request.read()
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise bad_request(
            f"the request body is not valid JSON: {exc}", code="invalid_json"
        ) from exc
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    return body


def ready_backend(backend: GenerationBackend | None, model: str | None) -> GenerationBackend:
    """The backend if it serves `model` and is ready; else 404 or 503."""
    if backend is None:
        raise unavailable(
            "no model is served: the coordinator runs the control plane only (--model none)",
            code="no_model",
        )
    if model is not None and model != backend.model_name:
        raise ApiError(
            404,
            f"The model '{model}' does not exist; this server serves '{backend.model_name}'.",
            param="model",
            code="model_not_found",
        )
    state = backend.state()
    if state != READY:
        raise unavailable(f"the model is not ready yet: {state}", code="model_not_ready")
    return backend


def _prompt_ids(backend: GenerationBackend, req: CompletionRequest) -> list[int]:
    if req.messages is not None:
        ids = backend.encode_chat(req.messages)
    elif isinstance(req.prompt, str):
        ids = backend.encode(req.prompt)
    else:
        ids = list(req.prompt or [])
    if not ids:
        raise bad_request("the prompt is empty (0 tokens)", param="prompt")
    return ids


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


class CompletionHandlers:
    """The two generation endpoints over one backend (None: control plane only)."""

    def __init__(self, backend: GenerationBackend | None, *, default_max_tokens: int) -> None:
        self._backend = backend
        self._default_max_tokens = default_max_tokens

    async def chat(self, request: web.Request) -> web.StreamResponse:
        req = parse_chat_request(await read_json_object(request))
        return await self._serve(request, req)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req = parse_completion_request(await read_json_object(request))
        return await self._serve(request, req)

    async def _serve(self, request: web.Request, req: CompletionRequest) -> web.StreamResponse:
        backend = ready_backend(self._backend, req.model)
        prompt_ids = _prompt_ids(backend, req)
        max_tokens = resolve_max_tokens(
            req.max_tokens,
            prompt_tokens=len(prompt_ids),
            context_length=backend.context_length,
            default_cap=self._default_max_tokens,
            prompt_param="messages" if req.kind == "chat" else "prompt",
        )
        params = dataclasses.replace(req.sampling, max_tokens=max_tokens)
        run = TextGeneration(backend, prompt_ids, params, req.stop)
        shaper = ResponseShaper(
            kind=req.kind, model=backend.model_name, include_usage=req.include_usage
        )
        try:
            if req.stream:
                return await _stream_answer(request, run, shaper)
            return await _full_answer(request, run, shaper)
        finally:
            request[USAGE_KEY] = Usage(run.prompt_tokens, run.completion_tokens)


async def _full_answer(
    request: web.Request, run: TextGeneration, shaper: ResponseShaper
) -> web.StreamResponse:
    parts = []
    async with contextlib.aclosing(run.deltas()) as deltas:
        async for delta in deltas:
            parts.append(delta)
            if _client_gone(request):
                logger.info("%s: client gone, generation cancelled", shaper.id)
                return web.Response(status=CLIENT_CLOSED_STATUS)
    assert run.finish_reason is not None
    usage = Usage(run.prompt_tokens, run.completion_tokens)
    return web.json_response(shaper.completion("".join(parts), run.finish_reason, usage))


async def _stream_answer(
    request: web.Request, run: TextGeneration, shaper: ResponseShaper
) -> web.StreamResponse:
    async with contextlib.aclosing(run.deltas()) as deltas:
        first = await anext(deltas, None)  # errors before the first token: plain HTTP errors
        response = await open_event_stream(request)
        try:
            await _send_chunks(request, response, deltas, first, run, shaper)
        except ConnectionResetError:
            logger.info("%s: client closed the stream, generation cancelled", shaper.id)
        except BackendUnavailable as exc:
            logger.warning("%s: backend failed mid-stream: %s", shaper.id, exc)
            await _end_with_error(response, str(exc), "backend_unavailable")
        except Exception:
            logger.exception("%s: generation failed mid-stream", shaper.id)
            await _end_with_error(response, "internal error during generation", "internal_error")
    return response


async def _send_chunks(
    request: web.Request,
    response: web.StreamResponse,
    deltas: AsyncIterator[str],
    first: str | None,
    run: TextGeneration,
    shaper: ResponseShaper,
) -> None:
    if shaper.kind == "chat":
        await send_event(response, shaper.chunk("", first=True))
    if first:
        await send_event(response, shaper.chunk(first))
    async for delta in deltas:
        if delta:
            await send_event(response, shaper.chunk(delta))
        elif _client_gone(request):
            raise ConnectionResetError("client closed the connection")
    await send_event(response, shaper.chunk("", finish_reason=run.finish_reason))
    if shaper.include_usage:
        usage = Usage(run.prompt_tokens, run.completion_tokens)
        await send_event(response, shaper.usage_chunk(usage))
    await send_done(response)


async def _end_with_error(response: web.StreamResponse, message: str, code: str) -> None:
    with contextlib.suppress(ConnectionResetError):
        await send_event(response, error_body(message, error_type=SERVER_ERROR, code=code))
        await response.write_eof()
