"""Inputs for the API fuzz test (tests/test_api_fuzz.py): Hypothesis strategies.

`good_bodies` are valid requests with sampling values from their whole ranges;
`valid_ish_bodies` put some values far outside them; `mutated_bodies` set random
fields to random JSON; `raw_requests` turn any of those into bytes (sometimes
truncated, with invalid UTF-8, random, or over the body limit) with right, wrong
or missing keys and request ids; `drops` are requests a client hangs up on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

KEY = "fuzz-api-key-0123456789"
MAX_BODY = 1 << 20
VOCAB = 320  # the tiny model's embedding rows; its tokenizer knows fewer (padded, as in Qwen)

TRICKY_TEXT = ["", "\ud800", "a\udfffb", "\x00", "<|endoftext|>", "\u202e🌍", "é" * 50]
SPECIAL_NUMBERS = [
    0, -1, 1, 2, 127, 128, 129, VOCAB - 1, VOCAB, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1,
    10**30, 99999999999999999999999, 0.0, -0.0, 1e-300, 5e-324, 1e-5, 0.5, 1.0, 2.0,
    2.0000001, 1e308, -1e308, float("nan"), float("inf"), float("-inf"),
]  # fmt: skip
FIELDS = [
    "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
    "top_p", "top_k", "seed", "stop", "stream", "stream_options", "n", "logprobs", "echo",
    "logit_bias", "user", "response_format", "tools", "best_of", "suffix",
]  # fmt: skip

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(TRICKY_TEXT),
    st.sampled_from(SPECIAL_NUMBERS),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=25,
)
token_ids = st.one_of(
    st.integers(0, 320), st.integers(-3, 400), st.sampled_from(SPECIAL_NUMBERS[:14])
)
prompts = st.one_of(
    st.text(max_size=200),
    st.lists(token_ids, min_size=0, max_size=40),
    st.lists(st.integers(0, VOCAB - 1), min_size=100, max_size=300),  # about the context
    st.lists(st.lists(token_ids, max_size=5), max_size=3),
    st.sampled_from(TRICKY_TEXT),
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "x"]),
            "content": st.one_of(
                st.text(max_size=100),
                st.sampled_from(TRICKY_TEXT),
                st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text()})),
                json_values,
            ),
        }
    ),
    max_size=4,
)


short_text = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)
good_messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "system", "assistant", "developer"]),
            "content": st.one_of(
                short_text,
                st.lists(
                    st.fixed_dictionaries({"type": st.just("text"), "text": short_text}),
                    min_size=1,
                    max_size=2,
                ),
            ),
        }
    ),
    min_size=1,
    max_size=2,
)
SAMPLING = {
    "temperature": st.one_of(st.floats(0, 2), st.sampled_from([0, 1e-300, 1e-6, 2])),
    "top_p": st.one_of(st.floats(1e-9, 1), st.sampled_from([5e-324, 1])),
    "top_k": st.one_of(st.integers(-1, 400), st.just(2**63 - 1)),
    "seed": st.one_of(st.integers(0, 1000), st.just(2**63 - 1)),
}


@st.composite
def good_bodies(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A valid request with sampling values from their whole ranges: always answered."""
    chat = draw(st.booleans())
    body: dict[str, Any]
    if chat:
        body = {"messages": draw(good_messages)}
    else:
        ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=60)
        body = {"prompt": draw(st.one_of(short_text, ids, ids.map(lambda p: [p])))}
    limit = "max_completion_tokens" if chat and draw(st.booleans()) else "max_tokens"
    body[limit] = draw(st.integers(1, 12))
    for name, values in SAMPLING.items():
        if draw(st.booleans()):
            body[name] = draw(values)
    if draw(st.booleans()):
        body["stop"] = draw(st.one_of(short_text, st.lists(short_text, max_size=4)))
    body["stream"] = draw(st.booleans())
    if body["stream"] and draw(st.booleans()):
        body["stream_options"] = {"include_usage": draw(st.booleans())}
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


@st.composite
def valid_ish_bodies(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A good request with some values from far outside their ranges."""
    path, body = draw(good_bodies())
    chat = path == "/v1/chat/completions"
    if draw(st.booleans()):
        body["messages" if chat else "prompt"] = draw(messages if chat else prompts)
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
        if draw(st.integers(0, 3)) == 0:
            body[name] = draw(
                st.one_of(st.floats(-1, 3), st.integers(-2, 50), st.sampled_from(SPECIAL_NUMBERS))
            )
    return path, body


@st.composite
def mutated_bodies(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    path, body = draw(valid_ish_bodies())
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.one_of(st.sampled_from(FIELDS), st.text(max_size=6)))
        if draw(st.integers(0, 4)) == 0:
            body.pop(name, None)
        else:
            body[name] = draw(json_values)
    return path, body


@st.composite
def raw_requests(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str]]:
    """(path, body bytes, headers): JSON, broken JSON, random bytes, oversize bodies."""
    path, body = draw(st.one_of(good_bodies(), valid_ish_bodies(), mutated_bodies()))
    raw = json.dumps(body).encode()
    kind = draw(st.sampled_from(["json", "json", "json", "truncated", "bad-utf8", "bytes", "big"]))
    if kind == "truncated":
        raw = raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    elif kind == "bad-utf8":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"])) + raw[at:]
    elif kind == "bytes":
        raw = draw(st.binary(max_size=300))
    elif kind == "big":
        size = draw(st.sampled_from([MAX_BODY - 100, MAX_BODY + 1, 3 * MAX_BODY]))
        raw = json.dumps({"prompt": "z" * size}).encode()
    auth = draw(st.sampled_from(["good"] * 17 + ["none", "wrong", "basic"]))
    headers = {"Content-Type": "application/json"}
    if auth != "none":
        headers["Authorization"] = {"good": f"Bearer {KEY}", "wrong": "Bearer nope"}.get(
            auth, f"Basic {KEY}"
        )
    if draw(st.booleans()):
        alphabet = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
        headers["X-Request-Id"] = draw(st.text(alphabet, max_size=140))
    return path, raw, headers


@dataclass(frozen=True)
class Drop:
    """Send a request and hang up: after `sent` bytes of it, or after reading `read` bytes."""

    body: bytes
    sent: int
    read: int


@st.composite
def drops(draw: st.DrawFn) -> Drop:
    _, body = draw(good_bodies())
    body.update(stream=draw(st.booleans()), max_tokens=draw(st.integers(1, 60)))
    if "prompt" in body:
        body["prompt"] = draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40))
    raw = json.dumps(body).encode()
    return Drop(raw, draw(st.integers(0, len(raw))), draw(st.integers(0, 3000)))
