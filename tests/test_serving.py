"""The serving stack end to end: `edge-coordinator serve --model smollm2-135m --local 3`.

Real processes on loopback, the real default model, the official openai client.
Checks the answer, that concurrent requests batched together each get exactly what
they get alone, and that a lost agent fails its request with a 503 naming it while
the coordinator re-plans and serves the next request (and, being a `--local` agent,
is restarted and taken back in).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.procs import free_ports, wait_until

pytestmark = pytest.mark.slow
TOKEN = "serving-test-token"
MODEL = "smollm2-135m"


class Server:
    def __init__(self, tmp: Path) -> None:
        pytest.importorskip("gguf")
        from edgecluster.weights.models import resolve_model

        try:
            resolve_model(MODEL)  # convert once, before the coordinator needs it
        except ValueError as exc:
            pytest.skip(str(exc))
        self.http_port, self.grpc_port = free_ports(2)
        self.log = open(tmp / "coordinator.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "coordinator.cli", "serve", "--model", MODEL,
                "--local", "3", "--no-mdns", "--token", TOKEN, "--max-context", "1024",
                "--port", str(self.http_port), "--grpc-port", str(self.grpc_port),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "EDGE_LOCAL_DATA": str(tmp)},
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{self.http_port}"
        try:
            wait_until(lambda: self.health()[0] == 200, 240, "the model to be served")
        except BaseException:
            self.stop()  # the fixture's teardown does not run when its setup fails
            raise

    def health(self) -> tuple[int, dict[str, Any]]:
        try:
            return self.request("GET", "/health")
        except OSError:
            return 0, {}

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    def agents(self) -> list[psutil.Process]:
        found = []
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if "agents.cli" in " ".join(child.cmdline()):
                    found.append(child)
            except psutil.NoSuchProcess:
                continue
        return found

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    s = Server(tmp_path_factory.mktemp("serving"))
    yield s
    agents = s.agents()
    s.stop()
    assert not [p for p in agents if p.is_running()], "local agents outlived the coordinator"


def test_openai_client_answers_paris(server: Server) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
    )
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_cluster_view_shows_each_agents_shard(server: Server) -> None:
    status, view = server.request("GET", "/v1/cluster")
    assert status == 200
    shards = [a["shard"] for a in view["agents"] if a["state"] == "alive"]
    assert len(shards) == 3 and all(shards)
    columns = sorted(tuple(s["mlp_columns"]) for s in shards)
    assert columns[0][0] == 0 and columns[-1][1] == 1536  # every MLP column, once
    assert all(a[1] == b[0] for a, b in zip(columns, columns[1:], strict=False))
    assert all(s["weight_bytes"] > 0 for s in shards)


def _complete(server: Server, prompt: str, max_tokens: int = 16) -> str:
    status, body = server.request(
        "POST",
        "/v1/completions",
        {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
    )
    assert status == 200, body
    return str(body["choices"][0]["text"])


def test_concurrent_requests_get_what_they_get_alone(server: Server) -> None:
    prompts = [
        "The largest planet in the solar system is",
        "def fibonacci(n):",
        "Once upon a time, in a small village,",
        "The three primary colors are",
    ]
    alone = [_complete(server, p) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: _complete(server, p), prompts))
    assert together == alone


def test_bad_requests_get_4xx_and_do_not_disturb_others(server: Server) -> None:
    status, body = server.request("POST", "/v1/completions", {"model": "nope", "prompt": "x"})
    assert status == 404 and "error" in body
    status, body = server.request(
        "POST", "/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -1}
    )
    assert status == 400 and "temperature" in body["error"]["message"]
    status, body = server.request(
        "POST", "/v1/completions", {"model": MODEL, "prompt": "word " * 1100, "max_tokens": 4}
    )
    assert status == 400 and "context" in body["error"]["message"]
    assert "Paris" in _complete(server, "The capital of France is", 8)


def test_lost_agent_fails_its_request_then_the_cluster_replans(server: Server) -> None:
    victim = server.agents()[0]
    victim_name = victim.cmdline()[victim.cmdline().index("--name") + 1]
    story = [{"role": "user", "content": "Write a long story about a dragon and a knight."}]
    body = {"model": MODEL, "messages": story, "max_tokens": 400, "temperature": 0,
            "stream": True}  # fmt: skip
    req = urllib.request.Request(
        server.url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    events: list[str] = []
    with urllib.request.urlopen(req, timeout=60) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            events.append(line)
            if len(events) == 3:
                victim.send_signal(signal.SIGKILL)
    assert any("error" in e and victim_name in e for e in events), events[-3:]
    assert "data: [DONE]" not in events
    started = time.monotonic()
    wait_until(lambda: server.health()[0] == 200, 90, "the coordinator to re-plan")
    assert time.monotonic() - started < 90  # generous: a loaded box re-slices 2 shards
    assert "Paris" in _complete(server, "The capital of France is", 8)

    # A `--local` agent is restarted: it rejoins as the same node and is taken back in.
    def all_three_serving() -> bool:
        status, view = server.request("GET", "/v1/cluster")
        alive = [a for a in view["agents"] if a["state"] == "alive"]
        return len(alive) == 3 and all(a["shard"] for a in alive)

    wait_until(all_three_serving, 120, f"{victim_name} to be restarted and taken back in", 0.5)
    assert not victim.is_running() or victim.status() != psutil.STATUS_ZOMBIE
    assert "Paris" in _complete(server, "The capital of France is", 8)
