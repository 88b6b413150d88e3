"""Fuzzing the HTTP API of a real coordinator with real agents.

One `edge-coordinator serve --local 2` per module, over a tiny random Llama with a
small byte-level BPE tokenizer and a chat template, all made by the test. Hypothesis
sends random and mutated requests (random JSON, wrong types, huge and negative
numbers, token ids, sampling values, sizes, invalid UTF-8, truncated JSON, missing
or wrong keys) and drops connections mid-request and mid-stream. Every answer must
be a 2xx or 4xx in OpenAI's shape (5xx only 503/504), carry an X-Request-Id, and
afterwards the coordinator must be healthy, give the same greedy answer as before,
and not have grown its memory without bound. The same cluster also shows the wait
queue's 429 and that eight 800 KB prompts do not stall /health.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.procs import HOST, ProcessPool, command, free_ports, wait_until

pytestmark = pytest.mark.slow

KEY = "fuzz-api-key-0123456789"
MAX_CONTEXT = 128
MAX_BODY = 1 << 20
GREEDY = {"prompt": [5, 17, 42, 99, 7], "max_tokens": 16, "temperature": 0}
RSS_GROWTH_BYTES = 200 << 20
HUGE_PROMPT = "The quick brown fox jumps over the lazy dog. " * 17_800  # 800 KB
SETTINGS = {
    "deadline": None,  # real network round trips
    "derandomize": True,  # the same inputs every run: a failure is reproducible
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}


def make_tiny_model(path: Path) -> Path:
    """A 2-layer random Llama with a 300-odd-token byte-level BPE and a chat template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(
        ["The quick brown fox jumps over the lazy dog. Once upon a time."], trainer
    )
    template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", chat_template=template
    )
    tok.save_pretrained(path)
    torch.manual_seed(11)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=256,
        tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    LlamaForCausalLM(config).eval().save_pretrained(path)
    return path


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    raw: bytes


@dataclass
class Server:
    url: str
    port: int
    pid: int
    stderr: Path

    def send(
        self,
        path: str,
        body: bytes,
        headers: dict[str, str] | None = None,
        method: str = "POST",
    ) -> Answer:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return Answer(response.status, dict(response.headers), response.read())
        finally:
            conn.close()

    def post(self, path: str, body: dict[str, Any], key: str | None = KEY) -> Answer:
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        return self.send(path, json.dumps(body).encode(), headers)

    def healthy(self) -> bool:
        with contextlib.suppress(OSError):
            return self.send("/health", b"", method="GET").status == 200
        return False

    def greedy_text(self) -> str:
        answer = self.post("/v1/completions", GREEDY)
        assert answer.status == 200, answer
        return str(json.loads(answer.raw)["choices"][0]["text"])

    def rss(self) -> int:
        return int(psutil.Process(self.pid).memory_info().rss)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("fuzz")
    model = make_tiny_model(root / "tiny-llama")
    pool = ProcessPool(root)
    http_port, grpc_port = free_ports(2)
    argv = [
        *command("edge-coordinator"), "serve", "--model", str(model), "--local", "2",
        "--no-mdns", "--token", "fuzz-token", "--port", str(http_port),
        "--grpc-port", str(grpc_port), "--max-context", str(MAX_CONTEXT),
        "--api-key", KEY, "--max-body", str(MAX_BODY), "--max-queue", "2",
        "--cors-origins", "http://localhost:3000",
    ]  # fmt: skip
    try:
        proc = pool.start("coordinator", argv)
        srv = Server(f"http://{HOST}:{http_port}", http_port, proc.pid, proc.stderr_path)

        def ready() -> bool:
            assert proc.running(), proc.describe()
            return srv.healthy()

        wait_until(ready, 180, "the tiny model to be served", interval_s=0.2)
        yield srv
    finally:
        pool.close()


# ---- what every answer must look like ----


def check_answer(answer: Answer, sent_id: str | None = None) -> None:
    assert answer.status < 500 or answer.status in (503, 504), answer
    request_id = answer.headers.get("X-Request-Id", "")
    assert request_id, answer.headers
    if sent_id is not None and _sane(sent_id):
        assert request_id == sent_id
    if answer.status >= 400:
        error = json.loads(answer.raw)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        return
    if answer.headers.get("Content-Type", "").startswith("text/event-stream"):
        _check_stream(answer.raw)
    else:
        assert json.loads(answer.raw)["choices"], answer


def _check_stream(raw: bytes) -> None:
    blocks = [b for b in raw.decode().split("\n\n") if b]
    assert blocks and all(b.startswith("data: ") for b in blocks), raw[-300:]
    last = blocks[-1].removeprefix("data: ")
    if last != "[DONE]":
        code = json.loads(last)["error"]["code"]
        assert code in ("backend_unavailable", "timeout", "server_busy"), last


def _sane(request_id: str) -> bool:
    return 0 < len(request_id) <= 128 and all(0x20 < ord(c) < 0x7F for c in request_id)


# ---- strategies ----

TRICKY_TEXT = ["", "\ud800", "a\udfffb", "\x00", "<|endoftext|>", "\u202e🌍", "é" * 50]
SPECIAL_NUMBERS = [
    0, -1, 1, 2, 127, 128, 129, 313, 314, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1,
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
    st.lists(st.integers(0, 313), min_size=100, max_size=300),  # about the context
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
        ids = st.lists(st.integers(0, 313), min_size=1, max_size=60)
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


# ---- the tests ----


@pytest.fixture(scope="module")
def baseline(server: Server) -> dict[str, Any]:
    """The greedy answer, then the memory after a warm-up that includes huge prompts."""
    greedy = server.greedy_text()
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "stream": True}
    huge = {"prompt": HUGE_PROMPT}
    with ThreadPoolExecutor(2) as pool:  # as many at once as the API tokenizes at once
        answers = list(pool.map(lambda _: server.post("/v1/completions", huge), range(2)))
    assert [a.status for a in answers] == [400, 400]
    for _ in range(10):
        check_answer(server.post("/v1/chat/completions", chat))
    return {"greedy": greedy, "rss": server.rss()}


@settings(max_examples=300, **SETTINGS)
@given(sent=raw_requests())
def test_random_and_mutated_requests(
    server: Server, baseline: dict[str, Any], sent: tuple[str, bytes, dict[str, str]]
) -> None:
    path, raw, headers = sent
    check_answer(server.send(path, raw, headers), headers.get("X-Request-Id"))


@settings(max_examples=120, **SETTINGS)
@given(sent=good_bodies())
def test_valid_requests_are_answered(
    server: Server, baseline: dict[str, Any], sent: tuple[str, dict[str, Any]]
) -> None:
    path, body = sent
    answer = server.post(path, body)
    check_answer(answer)
    if answer.status != 200:  # a short text can still be many byte-level tokens
        assert json.loads(answer.raw)["error"]["code"] == "context_length_exceeded", answer
    elif body["stream"]:
        assert answer.raw.endswith(b"data: [DONE]\n\n"), answer.raw[-300:]


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
        body["prompt"] = draw(st.lists(st.integers(0, 313), min_size=1, max_size=40))
    raw = json.dumps(body).encode()
    return Drop(raw, draw(st.integers(0, len(raw))), draw(st.integers(0, 3000)))


def _drop(server: Server, drop: Drop) -> None:
    path = "/v1/chat/completions" if b'"messages"' in drop.body else "/v1/completions"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(drop.body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((HOST, server.port), timeout=5) as sock:
        sock.sendall(head + drop.body[: drop.sent])
        if drop.sent < len(drop.body):
            return  # a truncated body, then gone
        received = 0
        with contextlib.suppress(TimeoutError, ConnectionError):
            while received < drop.read:
                chunk = sock.recv(512)
                if not chunk:
                    break
                received += len(chunk)


@settings(max_examples=50, **SETTINGS)
@given(drop=drops())
def test_clients_that_hang_up(server: Server, baseline: dict[str, Any], drop: Drop) -> None:
    _drop(server, drop)
    assert server.healthy()


def test_the_queue_bound_answers_429_with_retry_after(
    server: Server, baseline: dict[str, Any]
) -> None:
    """16 requests run in the batch, --max-queue 2 wait; the rest are told to come back."""
    body = {"prompt": [1, 2, 3], "max_tokens": 120, "temperature": 0}
    with ThreadPoolExecutor(40) as pool:
        answers = list(pool.map(lambda _: server.post("/v1/completions", body), range(40)))
    statuses = [a.status for a in answers]
    assert set(statuses) <= {200, 429}, statuses
    busy = [a for a in answers if a.status == 429]
    assert busy, statuses
    for answer in busy:
        assert answer.headers["Retry-After"] == "1"
        assert "--max-queue" in json.loads(answer.raw)["error"]["message"]
    texts = {json.loads(a.raw)["choices"][0]["text"] for a in answers if a.status == 200}
    assert len(texts) == 1  # greedy: all who got in got the same answer


def test_eight_800_kb_prompts_do_not_stall_health(server: Server, baseline: dict[str, Any]) -> None:
    prompt = HUGE_PROMPT
    done = threading.Event()
    latencies: list[float] = []

    def poll() -> None:
        while not done.is_set():
            started = time.monotonic()
            assert server.healthy()
            latencies.append(time.monotonic() - started)
            time.sleep(0.02)

    with ThreadPoolExecutor(9) as pool:
        poller = pool.submit(poll)
        sent = [pool.submit(server.post, "/v1/completions", {"prompt": prompt}) for _ in range(8)]
        answers = [f.result() for f in sent]
        done.set()
        poller.result()
    for answer in answers:
        assert answer.status == 400, answer
        assert json.loads(answer.raw)["error"]["code"] == "context_length_exceeded"
    assert latencies and max(latencies) < 2.0, f"/health took {max(latencies):.2f} s"


def test_after_fuzzing_the_server_answers_as_before(
    server: Server, baseline: dict[str, Any]
) -> None:
    """Runs last in this module: health, the same greedy answer, bounded memory."""
    assert server.healthy()
    assert server.greedy_text() == baseline["greedy"]
    growth = server.rss() - baseline["rss"]
    assert growth < RSS_GROWTH_BYTES, f"coordinator RSS grew by {growth / 2**20:.0f} MiB"
    log = server.stderr.read_text(errors="replace")
    assert "Traceback" not in log, log[log.index("Traceback") - 2000 :][:6000]
