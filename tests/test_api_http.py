"""The HTTP API on a real loopback socket with plain HTTP clients and a fake backend."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.test_api_fakes import MODEL, FakeBackend, request, serve, stream

USER_HI = [{"role": "user", "content": "hi"}]
REPLY = "Hello, wörld! 🌍"


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": USER_HI, **fields}


def _assert_error(status: int, body: Any, expected: int, code: str | None) -> dict[str, Any]:
    assert status == expected, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["message"]
    return error


def test_health_models_and_cluster_follow_readiness() -> None:
    backend = FakeBackend(current_state="waiting for agents (1/3 alive)")
    with serve(backend) as url:
        assert request(f"{url}/health") == (
            503,
            {"status": "unavailable", "state": "waiting for agents (1/3 alive)"},
        )
        assert request(f"{url}/v1/models") == (200, {"object": "list", "data": []})
        status, body = request(f"{url}/v1/chat/completions", _chat())
        error = _assert_error(status, body, 503, "model_not_ready")
        assert "waiting for agents (1/3 alive)" in error["message"]
        backend.current_state = "ready"
        assert request(f"{url}/health") == (
            200,
            {"status": "ok", "state": "ready", "model": MODEL},
        )
        status, models = request(f"{url}/v1/models")
        assert [m["id"] for m in models["data"]] == [MODEL]
        assert request(f"{url}/v1/models/{MODEL}")[1]["object"] == "model"
        assert request(f"{url}/v1/cluster") == (200, backend.cluster_view())


def test_control_plane_only() -> None:
    with serve(None) as url:
        status, health = request(f"{url}/health")
        assert (status, health["state"]) == (200, "control plane only (no model)")
        assert request(f"{url}/v1/cluster")[1]["members"] == [{"id": "a1"}, {"id": "a2"}]
        assert request(f"{url}/v1/models")[1]["data"] == []
        status, body = request(f"{url}/v1/completions", {"prompt": "x"})
        _assert_error(status, body, 503, "no_model")


def test_chat_completion_shape_usage_and_sampling() -> None:
    backend = FakeBackend()
    with serve(backend) as url:
        status, body = request(
            f"{url}/v1/chat/completions",
            _chat(temperature=0, top_p=0.9, top_k=5, seed=3, max_completion_tokens=50),
        )
    assert status == 200
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == MODEL and isinstance(body["created"], int)
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": REPLY},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    prompt_tokens = len(backend.encode_chat(USER_HI))
    completion_tokens = len(REPLY.encode()) + 1  # and the EOS
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    _, params = backend.requests[0]
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (0.0, 0.9, 5, 3)
    assert params.max_tokens == 50


def test_completion_prompts_stop_and_length() -> None:
    backend = FakeBackend(reply="one two STOP three", eos=False)
    with serve(backend) as url:
        _, body = request(f"{url}/v1/completions", {"prompt": "go", "stop": ["STOP"]})
        choice = body["choices"][0]
        assert (choice["text"], choice["finish_reason"]) == ("one two ", "stop")
        assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
        assert body["usage"]["completion_tokens"] == len("one two STOP")
        _, body = request(f"{url}/v1/completions", {"prompt": [103, 111], "max_tokens": 5})
        assert (body["choices"][0]["text"], body["choices"][0]["finish_reason"]) == (
            "one t",
            "length",
        )
        assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}
    assert backend.closed[0] == len("one two STOP")  # stopped at once, backend closed


def test_default_max_tokens_is_capped() -> None:
    backend = FakeBackend(context_length=40, eos=False)
    with serve(backend, default_max_tokens=16) as url:
        request(f"{url}/v1/completions", {"prompt": "x" * 30})
        request(f"{url}/v1/completions", {"prompt": "x"})
    assert [params.max_tokens for _, params in backend.requests] == [10, 16]


@pytest.mark.parametrize(
    ("path", "body", "expected", "code", "words"),
    [
        ("/v1/chat/completions", b"{not json", 400, "invalid_json", "not valid JSON"),
        ("/v1/chat/completions", [1, 2], 400, "invalid_json", "JSON object"),
        ("/v1/chat/completions", {"model": MODEL}, 400, "invalid_value", "'messages'"),
        ("/v1/chat/completions", _chat(model="gpt-4o"), 404, "model_not_found", MODEL),
        ("/v1/chat/completions", _chat(temperature=5), 400, "invalid_value", "temperature"),
        ("/v1/chat/completions", _chat(n=3), 400, "unsupported_parameter", "n=1"),
        ("/v1/completions", {"prompt": "x" * 300}, 400, "context_length_exceeded", "300"),
        (
            "/v1/completions",
            {"prompt": "x" * 200, "max_tokens": 100},
            400,
            "context_length_exceeded",
            "300 tokens (200 in the prompt, 100 for the completion)",
        ),
        ("/v1/completions", {"prompt": ""}, 400, "invalid_value", "empty"),
        ("/v1/completions", {"prompt": ["a", "b"]}, 400, "unsupported_parameter", "batch"),
        ("/v2/nothing", {"prompt": "x"}, 404, "not_found", "/v2/nothing"),
    ],
)
def test_errors_are_openai_error_objects(
    path: str, body: Any, expected: int, code: str, words: str
) -> None:
    with serve(FakeBackend()) as url:
        status, answer = request(f"{url}{path}", body)
    assert words in _assert_error(status, answer, expected, code)["message"]


def test_wrong_method_is_405_json() -> None:
    with serve(FakeBackend()) as url:
        status, body = request(f"{url}/v1/chat/completions", method="GET")
    _assert_error(status, body, 405, "method_not_allowed")


def test_streaming_chat_chunks() -> None:
    with serve(FakeBackend()) as url:
        status, events = stream(
            f"{url}/v1/chat/completions",
            _chat(stream=True, stream_options={"include_usage": True}),
        )
    assert status == 200 and events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == REPLY
    assert all("\ufffd" not in c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert chunks[-2]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 20


def test_streaming_completion_with_stop() -> None:
    with serve(FakeBackend(reply="abc<|end|>def")) as url:
        _, events = stream(
            f"{url}/v1/completions", {"prompt": "p", "stream": True, "stop": "<|end|>"}
        )
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "abc"
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert "usage" not in events[0]


def test_backend_failure_before_first_token_is_503() -> None:
    with serve(FakeBackend(fail_after=0)) as url:
        status, body = request(f"{url}/v1/chat/completions", _chat(stream=True))
    assert "heartbeat" in _assert_error(status, body, 503, "backend_unavailable")["message"]


def test_backend_failure_mid_stream_sends_error_event() -> None:
    backend = FakeBackend(fail_after=5)
    with serve(backend) as url:
        status, events = stream(f"{url}/v1/chat/completions", _chat(stream=True))
        status_full, body = request(f"{url}/v1/chat/completions", _chat())
    assert status == 200
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "Hello"
    assert events[-1]["error"]["code"] == "backend_unavailable"
    assert "lost agent a2" in events[-1]["error"]["message"]
    _assert_error(status_full, body, 503, "backend_unavailable")


def test_concurrent_requests_one_bad() -> None:
    backend = FakeBackend(reply=lambda prompt: f"re:{prompt[-12:]}", token_delay_s=0.002)

    def one(i: int) -> tuple[int, Any]:
        if i == 3:
            return request(f"{url}/v1/completions", {"prompt": "x", "model": "other"})
        if i % 2:
            _, events = stream(f"{url}/v1/completions", {"prompt": f"prompt {i}", "stream": True})
            return 200, "".join(e["choices"][0]["text"] for e in events[:-1])
        _, body = request(f"{url}/v1/completions", {"prompt": f"prompt {i}"})
        return 200, body["choices"][0]["text"]

    with serve(backend) as url, ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, range(8)))
    for i, (status, answer) in enumerate(results):
        if i == 3:
            _assert_error(status, answer, 404, "model_not_found")
        else:
            assert (status, answer) == (200, f"re:prompt {i}")


def _open_and_drop(url: str, body: dict[str, Any], started: Callable[[bytes], bool]) -> None:
    """Sends a request on a raw socket and closes it once started(bytes received so far)."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        sock.sendall(head.encode() + payload)
        sock.settimeout(0.01)
        received = b""
        deadline = time.monotonic() + 5
        while not started(received) and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                received += sock.recv(4096)


def _wait_closed(backend: FakeBackend) -> list[int]:
    deadline = time.monotonic() + 5
    while not backend.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    return backend.closed


@pytest.mark.parametrize("streaming", [True, False])
def test_client_disconnect_cancels_generation(streaming: bool) -> None:
    backend = FakeBackend(context_length=100_000, eos=False, token_delay_s=0.005)
    body = {"prompt": "p", "max_tokens": 50_000, "stream": streaming}
    with serve(backend) as url:
        if streaming:
            _open_and_drop(url, body, lambda got: b"data: " in got)
        else:  # nothing arrives before the answer: drop once generation runs
            _open_and_drop(url, body, lambda got: bool(backend.requests))
        closed = _wait_closed(backend)
    assert len(closed) == 1 and closed[0] < 1000


def test_requests_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgecluster.api")
    with serve(FakeBackend()) as url:
        request(f"{url}/v1/chat/completions", _chat())
        request(f"{url}/nowhere")
    lines = [r.getMessage() for r in caplog.records if r.name == "edgecluster.api.http"]
    assert any(line.startswith("POST /v1/chat/completions 200 tokens=20+20") for line in lines)
    assert any(line.startswith("GET /nowhere 404") for line in lines)
