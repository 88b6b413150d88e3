"""Who may call the API, and how its answers are marked: API key, X-Request-Id, CORS.

A real loopback server over the fake backend; plain HTTP clients and the official
openai client.
"""

from __future__ import annotations

import logging
from typing import Any

import openai
import pytest

from tests.test_api_fakes import MODEL, FakeBackend, Reply, call, serve

KEY = "test-api-key-0123456789"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
ORIGIN = "http://localhost:3000"


def _assert_invalid_key(reply: Reply) -> str:
    assert reply.status == 401, reply
    assert reply.body["error"]["code"] == "invalid_api_key"
    assert reply.body["error"]["type"] == "invalid_request_error"
    assert reply.body["error"]["param"] is None
    assert reply.headers["WWW-Authenticate"] == "Bearer"
    message: str = reply.body["error"]["message"]
    assert KEY not in message
    return message


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", CHAT),
        ("/v1/completions", {"prompt": "x"}),
        ("/v1/models", None),
        ("/v1/cluster", None),
        ("/v1/nowhere", None),
    ],
)
def test_every_v1_route_needs_the_key(path: str, body: Any) -> None:
    backend = FakeBackend()
    with serve(backend, api_key=KEY) as url:
        missing = call(url + path, body)
        wrong = call(url + path, body, headers={"Authorization": f"Bearer {KEY}x"})
        not_bearer = call(url + path, body, headers={"Authorization": f"Basic {KEY}"})
        right = call(url + path, body, headers={"Authorization": f"Bearer {KEY}"})
        lowercase = call(url + path, body, headers={"Authorization": f"bearer {KEY}"})
    assert "didn't provide an API key" in _assert_invalid_key(missing)
    assert "Incorrect API key" in _assert_invalid_key(wrong)
    _assert_invalid_key(not_bearer)
    expected = 404 if path == "/v1/nowhere" else 200
    assert (right.status, lowercase.status) == (expected, expected), (right, lowercase)


def test_rejected_requests_never_reach_the_backend() -> None:
    backend = FakeBackend()
    with serve(backend, api_key=KEY) as url:
        assert call(url + "/v1/chat/completions", CHAT).status == 401
        assert backend.requests == []
        ok = call(url + "/v1/chat/completions", CHAT, headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status == 200 and len(backend.requests) == 1


def test_health_stays_open_with_a_key() -> None:
    with serve(FakeBackend(), api_key=KEY) as url:
        reply = call(url + "/health")
    assert (reply.status, reply.body["status"]) == (200, "ok")


def test_no_key_configured_means_no_check() -> None:
    with serve(FakeBackend()) as url:
        assert call(url + "/v1/models").status == 200
        assert call(url + "/v1/models", headers={"Authorization": "Bearer anything"}).status == 200


def test_openai_client_with_and_without_the_key() -> None:
    with serve(FakeBackend(), api_key=KEY) as url:
        good = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=10)
        bad = openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0, timeout=10)
        try:
            answer = good.chat.completions.create(model=MODEL, messages=CHAT["messages"])
            assert answer.choices[0].message.content
            with pytest.raises(openai.AuthenticationError) as caught:
                bad.models.list()
            assert caught.value.code == "invalid_api_key"
        finally:
            good.close()
            bad.close()


def test_request_id_is_echoed_when_sane_and_generated_otherwise() -> None:
    with serve(FakeBackend()) as url:
        echoed = call(url + "/v1/chat/completions", CHAT, headers={"X-Request-Id": "my-id.42"})
        generated = [call(url + "/v1/models"), call(url + "/v1/models")]
        too_long = call(url + "/health", headers={"X-Request-Id": "x" * 129})
        spaced = call(url + "/health", headers={"X-Request-Id": "two words"})
        error = call(url + "/nowhere", headers={"X-Request-Id": "err-1"})
    assert echoed.status == 200 and echoed.headers["X-Request-Id"] == "my-id.42"
    ids = [r.headers["X-Request-Id"] for r in (*generated, too_long, spaced)]
    assert len(set(ids)) == 4 and all(len(i) == 32 for i in ids)
    assert error.status == 404 and error.headers["X-Request-Id"] == "err-1"


def test_request_id_on_streams_and_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgecluster.api")
    with serve(FakeBackend(fail_after=3)) as url:
        reply = call(
            url + "/v1/chat/completions", {**CHAT, "stream": True}, headers={"X-Request-Id": "s-7"}
        )
        call(url + "/v1/models", headers={"X-Request-Id": "m-8"})
    assert reply.status == 200 and reply.headers["X-Request-Id"] == "s-7"
    assert b"backend_unavailable" in reply.body
    lines = [r.getMessage() for r in caplog.records]
    assert any(
        line.startswith("POST /v1/chat/completions 200") and "id=s-7" in line for line in lines
    )
    assert any(line.startswith("GET /v1/models 200") and "id=m-8" in line for line in lines)
    assert any("s-7" in line and "lost agent a2" in line for line in lines), lines


def _preflight(url: str, origin: str, path: str = "/v1/chat/completions") -> Reply:
    return call(
        url + path,
        method="OPTIONS",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )


def test_cors_preflight_and_headers_for_allowed_origins() -> None:
    with serve(FakeBackend(), cors_origins=(ORIGIN,), api_key=KEY) as url:
        preflight = _preflight(url, ORIGIN)  # browsers send no key in a preflight
        refused = _preflight(url, "http://evil.example")
        auth = {"Authorization": f"Bearer {KEY}"}
        allowed = call(url + "/v1/chat/completions", CHAT, headers={"Origin": ORIGIN, **auth})
        other = call(url + "/v1/models", headers={"Origin": "http://evil.example", **auth})
        unauthorized = call(url + "/v1/models", headers={"Origin": ORIGIN})
        streamed = call(
            url + "/v1/completions",
            {"prompt": "x", "stream": True},
            headers={"Origin": ORIGIN, **auth},
        )
    assert preflight.status == 204, preflight
    assert preflight.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    allow_headers = preflight.headers["Access-Control-Allow-Headers"].lower()
    assert "authorization" in allow_headers and "content-type" in allow_headers
    assert refused.status == 403 and "--cors-origins" in refused.body["error"]["message"]
    assert "Access-Control-Allow-Origin" not in refused.headers
    for reply in (allowed, unauthorized, streamed):
        assert reply.headers["Access-Control-Allow-Origin"] == ORIGIN, reply
        assert "X-Request-Id" in reply.headers["Access-Control-Expose-Headers"]
    assert allowed.status == 200 and unauthorized.status == 401 and streamed.status == 200
    assert other.status == 200 and "Access-Control-Allow-Origin" not in other.headers


def test_cors_preflight_allows_the_headers_a_client_asks_for() -> None:
    with serve(FakeBackend(), cors_origins=(ORIGIN,)) as url:
        asked = call(
            url + "/v1/chat/completions",
            method="OPTIONS",
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,x-stainless-os,content-type",
            },
        )
        bare = call(
            url + "/v1/chat/completions",
            method="OPTIONS",
            headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"},
        )
    assert asked.status == 204
    assert asked.headers["Access-Control-Allow-Headers"] == (
        "authorization,x-stainless-os,content-type"
    )
    assert bare.status == 204
    assert bare.headers["Access-Control-Allow-Headers"].startswith("Authorization, Content-Type")


def test_cors_any_origin() -> None:
    with serve(FakeBackend(), cors_origins=("*",)) as url:
        preflight = _preflight(url, "https://anything.example", "/v1/completions")
        reply = call(url + "/health", headers={"Origin": "https://anything.example"})
    assert preflight.status == 204 and preflight.headers["Access-Control-Allow-Origin"] == "*"
    assert reply.headers["Access-Control-Allow-Origin"] == "*"


def test_no_cors_without_the_flag() -> None:
    with serve(FakeBackend()) as url:
        preflight = _preflight(url, ORIGIN)
        reply = call(url + "/v1/models", headers={"Origin": ORIGIN})
    assert preflight.status == 405
    assert not any(h.startswith("Access-Control") for h in preflight.headers)
    assert not any(h.startswith("Access-Control") for h in reply.headers)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"api_key": "has space"}, "--api-key"),
        ({"api_key": ""}, "--api-key"),
        ({"cors_origins": ("localhost:3000",)}, "--cors-origins"),
        ({"cors_origins": ("http://a.example/path",)}, "--cors-origins"),
    ],
)
def test_bad_options_are_refused(options: dict[str, Any], words: str) -> None:
    from edgecluster.api.options import ApiOptions

    with pytest.raises(ValueError, match=words):
        ApiOptions(**options)
