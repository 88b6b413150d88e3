"""What the API refuses and bounds: body size (413), a busy backend (429), the deadline
(504 or an SSE error event), numbers and token ids out of range (400), and CPU work
kept off the event loop. A real loopback server over the fake backend.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.test_api_fakes import MODEL, FakeBackend, Reply, call, request, serve, stream

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def _error(reply: Reply, status: int, code: str) -> str:
    assert reply.status == status, reply
    error = reply.body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    return str(error["message"])


def test_body_over_the_limit_is_413_naming_limit_and_flag() -> None:
    backend = FakeBackend()
    with serve(backend, max_body_bytes=2048) as url:
        small = call(url + "/v1/completions", {"prompt": "x" * 100})
        big = call(url + "/v1/completions", {"prompt": "x" * 5000})
    assert small.status == 200
    message = _error(big, 413, "request_too_large")
    assert "2048 bytes" in message and "--max-body" in message
    assert len(backend.requests) == 1


def test_chunked_body_over_the_limit_is_413() -> None:
    """No Content-Length to check up front: the limit holds while reading."""
    with serve(FakeBackend(), max_body_bytes=2048) as url:
        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        body = json.dumps({"prompt": "y" * 6000}).encode()
        chunks = (body[i : i + 1000] for i in range(0, len(body), 1000))
        conn.request("POST", "/v1/completions", body=chunks, encode_chunked=True)
        response = conn.getresponse()
        status, answer = response.status, json.loads(response.read())
        conn.close()
    assert status == 413 and "--max-body" in answer["error"]["message"]


def test_busy_backend_is_429_with_retry_after() -> None:
    with serve(FakeBackend(busy_retry_after_s=1.5)) as url:
        plain = call(url + "/v1/chat/completions", CHAT)
        streamed = call(url + "/v1/chat/completions", {**CHAT, "stream": True})
    for reply in (plain, streamed):
        message = _error(reply, 429, "server_busy")
        assert "--max-queue" in message
        assert reply.headers["Retry-After"] == "2"  # whole seconds, rounded up


def test_deadline_cancels_a_full_answer_with_504() -> None:
    backend = FakeBackend(context_length=100_000, eos=False, token_delay_s=0.01)
    with serve(backend, request_timeout_s=0.5) as url:
        started = time.monotonic()
        reply = call(url + "/v1/completions", {"prompt": "p", "max_tokens": 50_000})
        elapsed = time.monotonic() - started
        closed = _wait_for(lambda: backend.closed)
    message = _error(reply, 504, "timeout")
    assert "0.5 s" in message and "--request-timeout" in message
    assert elapsed < 8  # generous: the point is that it did not run 50 000 tokens
    assert len(closed) == 1 and closed[0] < 5000  # the generation was cancelled


def test_deadline_ends_a_stream_with_an_error_event() -> None:
    backend = FakeBackend(context_length=100_000, eos=False, token_delay_s=0.01)
    with serve(backend, request_timeout_s=0.5) as url:
        status, events = stream(
            url + "/v1/completions", {"prompt": "p", "max_tokens": 50_000, "stream": True}
        )
        closed = _wait_for(lambda: backend.closed)
    assert status == 200 and "[DONE]" not in events
    assert any("choices" in e for e in events[:-1])  # tokens came before the deadline
    assert events[-1]["error"]["code"] == "timeout"
    assert "--request-timeout" in events[-1]["error"]["message"]
    assert len(closed) == 1 and closed[0] < 5000


def test_deadline_before_the_first_token_is_a_plain_504() -> None:
    backend = FakeBackend(token_delay_s=5.0)
    with serve(backend, request_timeout_s=0.3) as url:
        reply = call(url + "/v1/chat/completions", {**CHAT, "stream": True})
    _error(reply, 504, "timeout")


def _wait_for(get: Any, timeout_s: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not get() and time.monotonic() < deadline:
        time.sleep(0.01)
    return get()


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"prompt": "x", "seed": 99999999999999999999999}, "seed", "between 0 and"),
        ({"prompt": "x", "seed": -1}, "seed", "between 0 and"),
        ({"prompt": "x", "seed": 2**64}, "seed", "between 0 and"),
        ({"prompt": [1, 999999999]}, "prompt", "999999999"),
        ({"prompt": [257]}, "prompt", "257 tokens (ids 0 to 256)"),
        ({"prompt": [[1, 2**70]]}, "prompt", "out of range"),
        ({"prompt": "x", "max_tokens": 10**30}, "max_tokens", "between"),
        ({"prompt": "x", "top_k": 2**64}, "top_k", "between"),
        ({"prompt": "x", "temperature": 10**400}, "temperature", "out of range"),
        ({"prompt": "x", "temperature": -1e-320}, "temperature", "between 0 and 2"),
        ({"prompt": "x", "top_p": -0.0}, "top_p", "top_p"),
        ({"prompt": "a\ud800b"}, "prompt", "unpaired surrogate"),
        ({"prompt": "x", "stop": ["\udfff"]}, "stop", "unpaired surrogate"),
    ],
)
def test_numbers_and_ids_out_of_range_are_400(body: dict[str, Any], param: str, words: str) -> None:
    backend = FakeBackend()
    with serve(backend) as url:
        reply = call(url + "/v1/completions", body)
        after = call(url + "/v1/completions", {"prompt": "ok", "max_tokens": 3})
    assert reply.status == 400, reply
    assert reply.body["error"]["param"] == param and words in reply.body["error"]["message"]
    assert after.status == 200 and len(backend.requests) == 1


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b'{"prompt": "x", "temperature": NaN}', "NaN"),
        (b'{"prompt": "x", "top_p": Infinity}', "Infinity"),
        (b"[" * 100_000, "nests too deeply"),
        (b'{"prompt": "\xff\xfe"}', "not valid JSON"),
        (b'{"prompt": "x"', "not valid JSON"),
        (b'{"messages": [{"role": ["user"], "content": "x"}]}', "role"),
    ],
)
def test_malformed_bodies_are_400(raw: bytes, words: str) -> None:
    path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
    with serve(FakeBackend()) as url:
        status, body = request(url + path, raw)
    assert status == 400 and words in body["error"]["message"], body


def test_tiny_sampling_values_stay_safe_for_torch() -> None:
    """temperature 1e-300 would overflow logits / t; top_p 5e-324 is 0 in float32."""
    backend = FakeBackend()
    with serve(backend) as url:
        body = {"prompt": "x", "temperature": 1e-300, "top_p": 5e-324}
        assert request(url + "/v1/completions", body)[0] == 200
    params = backend.requests[0][1]
    assert (params.temperature, params.top_p) == (0.0, 1e-6)


class SlowTokenizer(FakeBackend):
    """A tokenizer that takes its time (as a real one does on 800 KB) and says where."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.encoded_on: list[str] = []

    def encode(self, text: str) -> list[int]:
        self.encoded_on.append(threading.current_thread().name)
        time.sleep(self.delay_s)  # blocks whatever thread runs it
        return super().encode(text)


def _poll_health(url: str, until: threading.Event) -> list[float]:
    """Seconds each /health took while `until` is not set."""
    latencies = []
    while not until.is_set():
        started = time.monotonic()
        status, _ = request(url + "/health")
        assert status == 200
        latencies.append(time.monotonic() - started)
        time.sleep(0.02)
    return latencies


def _fire(url: str, bodies: Sequence[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """Sends bodies at once while polling /health: (their statuses, health latencies)."""
    done = threading.Event()
    with ThreadPoolExecutor(len(bodies) + 1) as pool:
        health = pool.submit(_poll_health, url, done)
        sent = [pool.submit(request, url + "/v1/completions", b) for b in bodies]
        statuses = [f.result()[0] for f in sent]
        done.set()
        return statuses, health.result()


def test_tokenization_leaves_the_event_loop() -> None:
    """Eight 800 KB prompts, each tokenized in 0.4 s: /health still answers at once."""
    backend = SlowTokenizer(delay_s=0.4)
    prompt = "word " * 160_000  # 800 KB
    with serve(backend) as url:
        statuses, latencies = _fire(url, [{"prompt": prompt}] * 8)
    assert statuses == [400] * 8  # 800 000 tokens do not fit a 256-token context
    assert len(backend.encoded_on) == 8
    assert all(name.startswith("api-cpu") for name in backend.encoded_on), backend.encoded_on
    assert latencies and max(latencies) < 2.0, max(latencies)
