"""POST /v1/chat/completions and /v1/completions: validate, tokenize, generate, answer.

Order of checks: body size (413), JSON and fields (400), model name (404), backend
readiness (503), prompt token ids against the vocabulary and the prompt length
against the context (400); only then does generation start. Large bodies are
parsed, and every prompt is tokenized, on a small thread pool, never on the event
loop, so one huge prompt does not stall `/health` or other streams; after a large
body the allocator's free memory goes back to the OS (malloc_trim), so a burst of
huge prompts does not leave the coordinator hundreds of MiB larger.

Every request has a deadline (`ApiOptions.request_timeout_s`) from its arrival:
past it the generation is cancelled and the client gets a 504, or an SSE error
event once the stream has started. A streaming request waits for its first token
before sending headers, so a backend that fails at once still gets a plain 503
(or 429 when busy); later failures become an SSE error event. Client disconnects
close the generation, which cancels the backend request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from aiohttp import web

from edgecluster.api.backend import BackendBusy, BackendUnavailable, GenerationBackend
from edgecluster.api.errors import (
    SERVER_ERROR,
    ApiError,
    bad_request,
    deadline_exceeded,
    error_body,
    payload_too_large,
    shorten,
    unavailable,
)
from edgecluster.api.generation import TextGeneration
from edgecluster.api.openai_responses import ResponseShaper, Usage
from edgecluster.api.openai_schema import (
    CompletionRequest,
    parse_chat_request,
    parse_completion_request,
    resolve_max_tokens,
)
from edgecluster.api.options import ApiOptions
from edgecluster.api.request_ids import current_request_id
from edgecluster.api.sse import open_event_stream, send_done, send_event
from edgecluster.device.allocator import release_free_memory

logger = logging.getLogger(__name__)

READY = "ready"
USAGE_KEY = web.RequestKey("edgecluster_usage", Usage)
CLIENT_CLOSED_STATUS = 499  # nginx's convention; only ever seen in the request log
LARGE_BODY_BYTES = 64 << 10  # bodies above this are parsed off the event loop
CPU_WORKERS = 2  # threads for parsing and tokenization (tokenizers release the GIL)
T = TypeVar("T")
Parse = Callable[[dict[str, Any]], CompletionRequest]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")


def decode_json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying why not."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise bad_request("the request body nests too deeply", code="invalid_json") from None
    except ValueError as exc:
        raise bad_request(
            f"the request body is not valid JSON: {exc}", code="invalid_json"
        ) from exc
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    return body


def _parse_body(raw: bytes, parse: Parse) -> CompletionRequest:
    return parse(decode_json_object(raw))


async def read_body(request: web.Request, limit_bytes: int) -> bytes:
    """The raw body; 413 at once when its declared length is over the limit."""
    if request.content_length is not None and request.content_length > limit_bytes:
        raise payload_too_large(limit_bytes)
    return await request.read()  # aiohttp raises 413 past client_max_size (chunked bodies)


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
            f"The model {shorten(model)} does not exist; this server serves "
            f"'{backend.model_name}'.",
            param="model",
            code="model_not_found",
        )
    state = backend.state()
    if state != READY:
        raise unavailable(f"the model is not ready yet: {state}", code="model_not_ready")
    return backend


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    """400 naming the first id outside 0..vocab_size-1."""
    if min(ids) >= 0 and max(ids) < vocab_size:
        return
    bad = next(t for t in ids if not 0 <= t < vocab_size)
    raise bad_request(
        f"token id {shorten(bad, 40)} in '{param}' is out of range: this model's vocabulary "
        f"has {vocab_size} tokens (ids 0 to {vocab_size - 1})",
        param=param,
    )


def prompt_ids(backend: GenerationBackend, req: CompletionRequest) -> list[int]:
    """Tokenizes the request's prompt (CPU work: call it off the event loop)."""
    param = "messages" if req.kind == "chat" else "prompt"
    try:
        if req.messages is not None:
            ids = backend.encode_chat(req.messages)
        elif isinstance(req.prompt, str):
            ids = backend.encode(req.prompt)
        else:
            ids = list(req.prompt or [])
    except ValueError as exc:  # e.g. text for a model without a tokenizer
        raise bad_request(str(exc), param=param) from exc
    if not ids:
        raise bad_request("the prompt is empty (0 tokens)", param=param)
    check_token_ids(ids, backend.vocab_size, param)
    return ids


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


@dataclasses.dataclass(frozen=True)
class Deadline:
    """A request's deadline on the event loop's clock."""

    at: float
    timeout_s: float

    @contextlib.asynccontextmanager
    async def guard(self) -> AsyncIterator[None]:
        """Cancels the block at the deadline and raises the 504 ApiError instead."""
        try:
            async with asyncio.timeout_at(self.at) as timeout:
                yield
        except TimeoutError:
            if not timeout.expired():
                raise  # someone else's timeout
            raise deadline_exceeded(self.timeout_s) from None


class CompletionHandlers:
    """The two generation endpoints over one backend (None: control plane only)."""

    def __init__(self, backend: GenerationBackend | None, options: ApiOptions) -> None:
        self._backend = backend
        self._options = options
        self._cpu = ThreadPoolExecutor(max_workers=CPU_WORKERS, thread_name_prefix="api-cpu")

    async def close(self) -> None:
        self._cpu.shutdown(wait=False, cancel_futures=True)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, parse_chat_request)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, parse_completion_request)

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._cpu, functools.partial(fn, *args))

    async def _handle(self, request: web.Request, parse: Parse) -> web.StreamResponse:
        timeout_s = self._options.request_timeout_s
        deadline = Deadline(asyncio.get_running_loop().time() + timeout_s, timeout_s)
        async with deadline.guard():
            req, run = await self._prepare(request, parse)
        assert self._backend is not None  # _prepare checked
        shaper = ResponseShaper(
            kind=req.kind, model=self._backend.model_name, include_usage=req.include_usage
        )
        try:
            if req.stream:
                return await _stream_answer(request, run, shaper, deadline)
            async with deadline.guard():
                return await _full_answer(request, run, shaper)
        finally:
            request[USAGE_KEY] = Usage(run.prompt_tokens, run.completion_tokens)

    async def _prepare(
        self, request: web.Request, parse: Parse
    ) -> tuple[CompletionRequest, TextGeneration]:
        raw = await read_body(request, self._options.max_body_bytes)
        large = len(raw) > LARGE_BODY_BYTES
        try:
            req = (
                await self._off_loop(_parse_body, raw, parse) if large else _parse_body(raw, parse)
            )
            backend = ready_backend(self._backend, req.model)
            ids = await self._off_loop(prompt_ids, backend, req)
        finally:
            if large:  # the scratch memory of a huge prompt goes back to the OS
                with contextlib.suppress(RuntimeError):  # the pool is shut down
                    self._cpu.submit(release_free_memory)
        max_tokens = resolve_max_tokens(
            req.max_tokens,
            prompt_tokens=len(ids),
            context_length=backend.context_length,
            default_cap=self._options.default_max_tokens,
            prompt_param="messages" if req.kind == "chat" else "prompt",
        )
        params = dataclasses.replace(req.sampling, max_tokens=max_tokens)
        return req, TextGeneration(backend, ids, params, req.stop)


def _who(shaper: ResponseShaper) -> str:
    return f"request {current_request_id()} ({shaper.id})"


async def _full_answer(
    request: web.Request, run: TextGeneration, shaper: ResponseShaper
) -> web.StreamResponse:
    parts = []
    async with contextlib.aclosing(run.deltas()) as deltas:
        async for delta in deltas:
            parts.append(delta)
            if _client_gone(request):
                logger.info("%s: client gone, generation cancelled", _who(shaper))
                return web.Response(status=CLIENT_CLOSED_STATUS)
    assert run.finish_reason is not None
    usage = Usage(run.prompt_tokens, run.completion_tokens)
    return web.json_response(shaper.completion("".join(parts), run.finish_reason, usage))


async def _stream_answer(
    request: web.Request, run: TextGeneration, shaper: ResponseShaper, deadline: Deadline
) -> web.StreamResponse:
    async with contextlib.aclosing(run.deltas()) as deltas:
        async with deadline.guard():  # errors before the first token: plain HTTP errors
            first = await anext(deltas, None)
        response = await open_event_stream(request)
        try:
            async with deadline.guard():
                await _send_chunks(request, response, deltas, first, run, shaper)
        except ConnectionResetError:
            logger.info("%s: client closed the stream, generation cancelled", _who(shaper))
        except (ApiError, BackendBusy, BackendUnavailable) as exc:
            code = _stream_error_code(exc)
            logger.warning("%s: stream ended by %s: %s", _who(shaper), code, exc)
            await _end_with_error(response, str(exc), code)
        except Exception:
            logger.exception("%s: generation failed mid-stream", _who(shaper))
            await _end_with_error(response, "internal error during generation", "internal_error")
    return response


def _stream_error_code(exc: Exception) -> str:
    if isinstance(exc, ApiError):  # the deadline
        return exc.code or "timeout"
    return "server_busy" if isinstance(exc, BackendBusy) else "backend_unavailable"


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
