"""`edge-coordinator serve --local N` as a child process that a benchmark talks to over HTTP.

`serve_coordinator(...)` starts the coordinator in its own process group (it starts
its local agents as its children), logs to a file, and on exit sends SIGTERM to the
group, then SIGKILL to whatever is left, so no agent outlives the benchmark. Should
the benchmark die without unwinding (SIGKILL), the kernel sends the coordinator
SIGTERM (PR_SET_PDEATHSIG), and it stops its agents.
"""

from __future__ import annotations

import ctypes
import functools
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from common import free_tcp_port

HOST = "127.0.0.1"
REQUEST_TIMEOUT_S = 300.0
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, kw_only=True)
class ServeOptions:
    model: str
    num_agents: int
    dtype: str
    token: str
    cache_dir: Path  # EDGE_CACHE_DIR of the coordinator and its agents
    weights: str | None = None  # `serve --weights MODE`; None: the flag is not passed


class CoordinatorProcess:
    """A running coordinator with its local agents, reached over HTTP."""

    def __init__(self, proc: subprocess.Popen[bytes], http_port: int, log_path: Path) -> None:
        self.proc, self.port, self.log_path = proc, http_port, log_path

    def request(self, method: str, path: str, body: Any = None) -> http.client.HTTPResponse:
        """Sends a request; the caller reads (and closes) the response."""
        conn = http.client.HTTPConnection(HOST, self.port, timeout=REQUEST_TIMEOUT_S)
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        return conn.getresponse()

    def get_json(self, path: str) -> tuple[int, Any]:
        with closing(self.request("GET", path)) as resp:
            return resp.status, json.loads(resp.read())

    def wait_ready(self, timeout_s: float) -> None:
        """Returns once GET /health answers 200; raises if the process dies first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise RuntimeError(f"the coordinator exited ({code}); {self.tail()}")
            with suppress(OSError):  # not listening yet
                if self.get_json("/health")[0] == 200:
                    return
            time.sleep(0.25)
        raise TimeoutError(f"the coordinator was not ready in {timeout_s:.0f} s; {self.tail()}")

    def agent_processes(self) -> list[psutil.Process]:
        """The local agents (the coordinator's children), ordered by agent name."""
        children = psutil.Process(self.proc.pid).children()
        return sorted(children, key=lambda c: cmdline_flag(c.cmdline(), "--name"))

    def tail(self, num_lines: int = 20) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()[-num_lines:]
        return "its log ends:\n" + "\n".join(lines)


class StreamError(RuntimeError):
    """An error event in a stream; `code` is its OpenAI-style code."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"the stream failed: {error}")
        self.code = str(error.get("code") or "")


def sse_events(resp: http.client.HTTPResponse) -> Iterator[dict[str, Any]]:
    """The JSON payloads of a server-sent event stream, as they arrive."""
    while line := resp.readline():
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        event = json.loads(line[len(b"data: ") :])
        if "error" in event:
            raise StreamError(event["error"])
        yield event


def cmdline_flag(argv: list[str], flag: str) -> str:
    """The value after `flag` in a command line, or "" when it is absent."""
    return argv[argv.index(flag) + 1] if flag in argv[:-1] else ""


def launcher() -> list[str]:
    script = Path(sys.executable).parent / "edge-coordinator"
    return [str(script)] if script.exists() else [sys.executable, "-m", "coordinator.cli"]


@functools.cache
def serve_supports_weights() -> bool:
    """Whether this checkout's `edge-coordinator serve` takes `--weights`."""
    done = subprocess.run([*launcher(), "serve", "--help"], capture_output=True, check=True)
    return b"--weights" in done.stdout


def serve_argv(opts: ServeOptions, http_port: int, grpc_port: int) -> list[str]:
    weights = ["--weights", opts.weights] if opts.weights else []
    return [
        *launcher(), "serve", "--model", opts.model, "--local", str(opts.num_agents),
        "--no-mdns", "--host", HOST, "--port", str(http_port), "--grpc-port", str(grpc_port),
        "--token", opts.token, "--dtype", opts.dtype, *weights,
    ]  # fmt: skip


def _term_with_parent() -> None:
    """In the child before exec: SIGTERM when the benchmark process dies."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@contextmanager
def serve_coordinator(opts: ServeOptions, log_dir: Path) -> Iterator[CoordinatorProcess]:
    """Starts the coordinator in its own process group; stops the whole group on exit."""
    http_port, grpc_port = free_tcp_port(HOST), free_tcp_port(HOST)
    log_path = log_dir / "coordinator.log"
    env = {**os.environ, "EDGE_CACHE_DIR": str(opts.cache_dir)}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            serve_argv(opts, http_port, grpc_port),
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_term_with_parent,
        )  # fmt: skip
    try:
        yield CoordinatorProcess(proc, http_port, log_path)
    finally:
        stop_process_group(proc)


def stop_process_group(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM to the group (the coordinator stops its agents), SIGKILL what is left."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # agents that outlived the coordinator
    proc.wait()
