"""A hung agent (SIGSTOP) mid-stream is named within seconds, and the survivors serve on.

A real `edge-coordinator serve --model DIR --local 3` on a tiny random Llama (token-id
prompts, no tokenizer). The data channel's read deadline (EDGE_READ_DEADLINE_S, 1.5 s
here, so that it acts before the heartbeats' 2.5 s) and keepalives find the silent
agent; the stream that already sent tokens ends with an SSE error event naming it, and
a non-streaming request in the same batch gets a 503 naming it; the coordinator
re-plans over the two others and the next request succeeds. An idle cluster (no step
running) longer than the deadline does not time out.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.procs import ProcessPool, command, free_ports, procs, wait_until  # noqa: F401
from tests.tiny_llama import make_tiny_llama

pytestmark = pytest.mark.slow
DEADLINE_S = 1.5  # under the heartbeat timeout (2.5 s): the data channel notices first
NAMED_WITHIN_S = 10.0  # the deadline, plus a loaded machine's slack


class Serving:
    def __init__(self, pool: ProcessPool, model: Path) -> None:
        self.model = str(model)  # the API's model name is what --model said
        self.http_port, grpc_port = free_ports(2)
        argv = [
            *command("edge-coordinator"), "serve", "--model", str(model), "--local", "3",
            "--no-mdns", "--token", "liveness-token", "--max-context", "4096",
            "--port", str(self.http_port), "--grpc-port", str(grpc_port),
        ]  # fmt: skip
        env = pool.env(EDGE_READ_DEADLINE_S=str(DEADLINE_S), EDGE_LINK_DELAY_MS="1")
        self.proc = pool.start("liveness-coordinator", argv, env)
        self.url = f"http://127.0.0.1:{self.http_port}"
        wait_until(lambda: self.health() == 200, 180, f"the model to be served\n{self.describe()}")

    def describe(self) -> str:
        return self.proc.describe() if hasattr(self, "proc") else ""

    def health(self) -> int:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=3) as resp:
                return int(resp.status)
        except (urllib.error.HTTPError, OSError):
            return 0

    def complete(self, max_tokens: int, stream: bool = False) -> Any:
        body = {"model": self.model, "prompt": [1, 2, 3, 4], "max_tokens": max_tokens,
                "temperature": 0, "stream": stream}  # fmt: skip
        request = urllib.request.Request(
            self.url + "/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        return urllib.request.urlopen(request, timeout=60)

    def agent(self, name: str) -> psutil.Process:
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            with_name = child.cmdline()
            if "agents.cli" in " ".join(with_name) and name in with_name:
                return child
        raise AssertionError(f"no local agent named {name}\n{self.describe()}")


def _status_of(server: Serving, max_tokens: int) -> tuple[int, str]:
    try:
        with server.complete(max_tokens) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_a_stopped_agent_is_named_within_seconds_and_the_rest_serve_on(
    procs: ProcessPool,  # noqa: F811
    tmp_path: Path,
) -> None:
    server = Serving(procs, make_tiny_llama(tmp_path / "tiny"))
    with server.complete(4) as resp:  # warm
        assert resp.status == 200
    time.sleep(DEADLINE_S + 1.0)  # idle longer than the deadline: nobody times out
    with server.complete(4) as resp:
        assert resp.status == 200, "an idle session must not time out"

    victim = server.agent("local-1")
    events: list[str] = []
    plain: list[tuple[int, str]] = []  # a non-streaming request batched with the stream
    other = threading.Thread(target=lambda: plain.append(_status_of(server, 3000)), daemon=True)
    try:
        with server.complete(3000, stream=True) as resp:
            other.start()
            stopped_at = None
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                events.append(line)
                if len(events) == 5:
                    victim.send_signal(signal.SIGSTOP)
                    stopped_at = time.monotonic()
        assert stopped_at is not None, "the stream ended before the agent was stopped"
        named_after = time.monotonic() - stopped_at
    finally:
        victim.send_signal(signal.SIGCONT)
        victim.kill()
    errors = [e for e in events if '"error"' in e]
    assert errors and "local-1" in errors[-1], events[-3:]
    assert "no data or keepalive" in errors[-1], errors[-1]
    assert "data: [DONE]" not in events
    assert named_after <= NAMED_WITHIN_S, f"named after {named_after:.1f} s"
    other.join(NAMED_WITHIN_S)
    assert plain and plain[0][0] == 503 and "local-1" in plain[0][1], plain

    wait_until(lambda: server.health() == 200, 60, "the survivors to re-plan")
    with server.complete(8) as resp:
        answer = json.loads(resp.read())
    assert resp.status == 200 and answer["choices"][0]["text"] is not None
