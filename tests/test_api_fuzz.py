"""Fuzzing the HTTP API of a real coordinator with real agents.

One `edge-coordinator serve --local 2` per module, over a tiny random Llama with a
small byte-level BPE tokenizer and a chat template, all made by the test. Hypothesis
sends random and mutated requests (random JSON, wrong types, huge and negative
numbers, token ids, sampling values, sizes, invalid UTF-8, truncated JSON, missing
or wrong keys) and drops connections mid-request and mid-stream. Every answer must
be a 2xx or 4xx in OpenAI's shape (no 5xx), carry an X-Request-Id, and
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
from hypothesis import HealthCheck, Phase, given, settings

from tests.api_fuzz_inputs import KEY, MAX_BODY, VOCAB, Drop, drops, good_bodies, raw_requests
from tests.procs import HOST, ProcessPool, command, free_ports, wait_until

pytestmark = pytest.mark.slow

MAX_CONTEXT = 128
REQUEST_TIMEOUT_S = 30  # a request the server loses ends in a 504, not a hung test
GREEDY = {"prompt": [5, 17, 42, 99, 7], "max_tokens": 16, "temperature": 0}
RSS_GROWTH_BYTES = 200 << 20
HUGE_PROMPT = "The quick brown fox jumps over the lazy dog. " * 17_800  # 800 KB
SETTINGS = {
    "deadline": None,  # real network round trips
    "derandomize": True,  # the same inputs every run: a failure is reproducible
    "database": None,
    "phases": [Phase.explicit, Phase.generate],  # no shrinking against a live server
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}


def make_tiny_model(path: Path) -> Path:
    """A 2-layer random Llama with a byte-level BPE (fewer tokens than its VOCAB embedding
    rows, so ids the tokenizer does not know are valid too) and a chat template."""
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
    assert len(tok) < VOCAB, len(tok)
    tok.save_pretrained(path)
    torch.manual_seed(11)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
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
        "--cors-origins", "http://localhost:3000", "--request-timeout", str(REQUEST_TIMEOUT_S),
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
    # No 5xx at all: a 503 (agent lost) or 504 (deadline) has no legitimate cause in
    # this cluster, where no agent dies and every request takes well under a second.
    assert answer.status < 500, answer
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
