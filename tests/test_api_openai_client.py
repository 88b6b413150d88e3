"""The official `openai` Python client against the API on a loopback socket."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.test_api_fakes import MODEL, FakeBackend, serve

REPLY = "Hello, wörld! 🌍"


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def client(backend: FakeBackend) -> Iterator[openai.OpenAI]:
    with serve(backend) as url:
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=10)
        yield api
        api.close()


def test_models_list(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]


def test_chat(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "brief"}, {"role": "user", "content": "hi"}],
        temperature=0,
        max_completion_tokens=100,
    )
    assert answer.choices[0].message.content == REPLY
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage.completion_tokens == 20


def test_completion_length(client: openai.OpenAI) -> None:
    answer = client.completions.create(model=MODEL, prompt="Say", max_tokens=5, stop=["\n"])
    assert answer.choices[0].text == "Hello"
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None and answer.usage.total_tokens == 3 + 5


def test_streaming_chat(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20


def test_streaming_completion_stop(client: openai.OpenAI) -> None:
    chunks = client.completions.create(model=MODEL, prompt="Say", stream=True, stop="wö")
    assert "".join(c.choices[0].text for c in chunks) == "Hello, "


def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert MODEL in caught.value.message
    assert caught.value.code == "model_not_found"


def test_bad_value_is_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="x", temperature=9)


def test_not_ready_is_503(client: openai.OpenAI, backend: FakeBackend) -> None:
    backend.current_state = "distributing shards"
    with pytest.raises(openai.InternalServerError, match="distributing shards") as caught:
        client.completions.create(model=MODEL, prompt="x")
    assert caught.value.status_code == 503


def test_mid_stream_failure_raises(client: openai.OpenAI, backend: FakeBackend) -> None:
    backend.fail_after = 4
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    with pytest.raises(openai.APIError, match="lost agent"):
        list(stream)
