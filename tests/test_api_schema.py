"""Request validation without a server: what is accepted, and the 400s for what is not."""

from __future__ import annotations

from typing import Any

import pytest

from edgecluster.api.errors import ApiError
from edgecluster.api.openai_schema import (
    parse_chat_request,
    parse_completion_request,
    parse_prompt,
    resolve_max_tokens,
)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _error(parse: Any, body: dict[str, Any]) -> ApiError:
    with pytest.raises(ApiError) as caught:
        parse(body)
    assert caught.value.status == 400
    return caught.value


def test_chat_request_fields() -> None:
    req = parse_chat_request(
        {
            **CHAT,
            "messages": [
                {"role": "developer", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                {"role": "assistant", "content": None},
            ],
            "max_completion_tokens": 9,
            "max_tokens": 3,
            "temperature": 0,
            "top_p": 0.5,
            "top_k": 4,
            "seed": 7,
            "stop": "x",
            "stream": True,
            "stream_options": {"include_usage": True},
            "n": 1,
            "user": "ignored",
        }
    )
    assert req.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": ""},
    ]
    assert req.max_tokens == 9
    assert (req.sampling.temperature, req.sampling.top_p, req.sampling.top_k) == (0.0, 0.5, 4)
    assert (req.sampling.seed, req.stop, req.stream, req.include_usage) == (7, ("x",), True, True)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [("hi", "hi"), ([1, 2], [1, 2]), (["hi"], "hi"), ([[3, 4]], [3, 4])],
)
def test_prompt_forms(prompt: Any, expected: Any) -> None:
    assert parse_prompt(prompt) == expected


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"messages": []}, "messages", "non-empty"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "one of"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "string"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content",
            "only parts of type 'text'",
        ),
        ({**CHAT, "max_tokens": "5"}, "max_tokens", "integer"),
        ({**CHAT, "max_tokens": 0}, "max_tokens", "at least 1"),
        ({**CHAT, "temperature": 3}, "temperature", "between 0 and 2"),
        ({**CHAT, "temperature": True}, "temperature", "number"),
        ({**CHAT, "top_p": 0}, "top_p", "(0, 1]"),
        ({**CHAT, "top_k": -2}, "top_k", "0 (off)"),
        ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({**CHAT, "stop": [1]}, "stop", "list of strings"),
        ({**CHAT, "stream": "yes"}, "stream", "true or false"),
        ({**CHAT, "stream_options": {"include_usage": True}}, "stream_options", "only allowed"),
        ({**CHAT, "n": 2}, "n", "only n=1"),
        ({**CHAT, "logprobs": True}, "logprobs", "not supported"),
        ({**CHAT, "model": 5}, "model", "string"),
    ],
)
def test_chat_errors_name_the_field(body: dict[str, Any], param: str, words: str) -> None:
    error = _error(parse_chat_request, body)
    assert error.param == param
    assert words in error.message
    assert error.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({}, "required"),
        ({"prompt": ["a", "b"]}, "batch prompts are not supported"),
        ({"prompt": [[1], [2]]}, "batch prompts are not supported"),
        ({"prompt": [1, -1]}, "negative"),
        ({"prompt": []}, "non-empty"),
        ({"prompt": [1.5]}, "list of token ids"),
        ({"prompt": "x", "echo": True}, "not supported"),
    ],
)
def test_completion_prompt_errors(body: dict[str, Any], words: str) -> None:
    assert words in _error(parse_completion_request, body).message


def test_max_tokens_default_is_capped_by_context_and_cap() -> None:
    assert resolve_max_tokens(None, prompt_tokens=10, context_length=100, default_cap=512) == 90
    assert resolve_max_tokens(None, prompt_tokens=10, context_length=4096, default_cap=512) == 512
    assert resolve_max_tokens(20, prompt_tokens=10, context_length=100, default_cap=512) == 20


def test_too_long_requests_state_the_lengths() -> None:
    with pytest.raises(ApiError) as caught:
        resolve_max_tokens(None, prompt_tokens=100, context_length=100, default_cap=512)
    assert "100 tokens" in caught.value.message and caught.value.code == "context_length_exceeded"
    with pytest.raises(ApiError) as caught:
        resolve_max_tokens(95, prompt_tokens=10, context_length=100, default_cap=512)
    assert "105 tokens (10 in the prompt, 95 for the completion)" in caught.value.message
    assert caught.value.param == "max_tokens"
