"""A fake GenerationBackend and a real loopback server for the API tests (no tests here).

The fake tokenizer is byte-level: one token per UTF-8 byte, so 'é' is two tokens
and '🌍' four, which exercises detokenization of multi-token characters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgecluster.api.backend import BackendBusy, BackendUnavailable, SamplingParams
from edgecluster.api.http import ApiOptions, bound_port, build_app, start_api_server

EOS = 256
MODEL = "fake-model"


@dataclass
class FakeBackend:
    """Replies with `reply` (or reply(prompt text)) byte by byte, then EOS.

    eos=False: repeats the reply until max_tokens. fail_after=n: raises
    BackendUnavailable before the n-th token; busy_retry_after_s: raises BackendBusy
    before the first. Records what it was asked and how
    many tokens each request yielded before its iterator was closed.
    """

    reply: str | Callable[[str], str] = "Hello, wörld! 🌍"
    context_length: int = 256
    eos: bool = True
    fail_after: int | None = None
    busy_retry_after_s: float | None = None  # set: every request is refused as busy
    token_delay_s: float = 0.0
    current_state: str = "ready"
    model_name: str = MODEL
    eos_token_ids: tuple[int, ...] = (EOS,)
    vocab_size: int = EOS + 1  # the 256 bytes and EOS
    requests: list[tuple[list[int], SamplingParams]] = field(default_factory=list)
    closed: list[int] = field(default_factory=list)  # tokens yielded, per closed request

    def state(self) -> str:
        return self.current_state

    def cluster_view(self) -> dict[str, Any]:
        return {"members": [{"id": "a1", "shard": "layers 0-3"}], "model": self.model_name}

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        turns = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return self.encode(turns + "<assistant>")

    def decode(self, token_ids: Sequence[int]) -> str:
        return bytes(t for t in token_ids if t < EOS).decode("utf-8", errors="replace")

    def _reply_ids(self, prompt_ids: list[int]) -> list[int]:
        text = self.reply(self.decode(prompt_ids)) if callable(self.reply) else self.reply
        return self.encode(text) + ([EOS] if self.eos else [])

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[int]:
        self.requests.append((prompt_ids, params))
        if self.busy_retry_after_s is not None:
            raise BackendBusy("3 requests are waiting (--max-queue 3)", self.busy_retry_after_s)
        ids = self._reply_ids(prompt_ids)
        yielded = 0
        try:
            for n in range(params.max_tokens):
                if self.fail_after is not None and n == self.fail_after:
                    raise BackendUnavailable("lost agent a2: heartbeat timeout")
                await asyncio.sleep(self.token_delay_s)
                yielded += 1
                yield ids[n % len(ids)]
                if ids[n % len(ids)] == EOS:
                    return
        finally:
            self.closed.append(yielded)


class FakeControl:
    def __init__(self, state: str = "ready") -> None:
        self.current_state = state

    def state(self) -> str:
        return self.current_state

    def cluster_view(self) -> dict[str, Any]:
        return {"members": [{"id": "a1"}, {"id": "a2"}], "model": None}


@contextlib.contextmanager
def serve(backend: FakeBackend | None, **kwargs: Any) -> Iterator[str]:
    """Runs build_app on 127.0.0.1 (free port) in a thread; yields the base URL.

    kwargs are ApiOptions fields (api_key, max_body_bytes, request_timeout_s, ...).
    """
    loop = asyncio.new_event_loop()
    app = build_app(backend=backend, control=FakeControl(), options=ApiOptions(**kwargs))
    runner = loop.run_until_complete(start_api_server(app, host="127.0.0.1", port=0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{bound_port(runner)}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: Any  # decoded JSON, or the raw bytes when not JSON


def call(
    url: str,
    body: Any = None,
    *,
    method: str | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """Like `request`, with request headers in and response headers out."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return _reply(response.status, dict(response.headers), response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return _reply(exc.code, dict(exc.headers), exc.read())


def _reply(status: int, headers: dict[str, str], raw: bytes) -> Reply:
    try:
        return Reply(status, headers, json.loads(raw))
    except ValueError:
        return Reply(status, headers, raw)


def request(url: str, body: Any = None, *, method: str | None = None) -> tuple[int, Any]:
    """(status, decoded JSON body); body may be bytes (sent raw) or JSON-able."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def stream(url: str, body: dict[str, Any]) -> tuple[int, list[Any]]:
    """(status, events): each SSE data payload decoded, '[DONE]' kept as the string."""
    status, raw = _post_raw(url, body)
    events: list[Any] = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return status, events


def _post_raw(url: str, body: dict[str, Any]) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        return response.status, response.read()
