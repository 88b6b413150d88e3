"""Real `edge-agent` / `edge-coordinator` processes on 127.0.0.1 for the fabric tests.

Every process gets a unique name, its own data dir and EDGE_CACHE_DIR under the
test's tmp dir, its own process group (so children it starts, like `--local`
agents, die with it), and logs in files (a full pipe can never stall it). The
`procs` fixture SIGKILLs every group it started at teardown, whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

HOST = "127.0.0.1"
BIN = Path(sys.executable).parent
T = TypeVar("T")

# Fields every member of `status --json` and GET /v1/cluster carries (issue 2).
MEMBER_FIELDS = {
    "id",
    "name",
    "address",
    "state",
    "cpu_count",
    "memory_total_bytes",
    "memory_available_bytes",
    "disk_read_bytes_per_s",
    "matmul_gflops",
    "accelerator",
}


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 right now (held together while chosen)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in socks]


def free_port() -> int:
    return free_ports(1)[0]


def wait_until(
    predicate: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.05
) -> T:
    """The first truthy value of `predicate()`; AssertionError naming `what` on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def command(tool: str) -> list[str]:
    """The argv prefix of a console script of this venv."""
    script = BIN / tool
    if script.exists():
        return [str(script)]
    module = {"edge-agent": "agents.cli", "edge-coordinator": "coordinator.cli"}[tool]
    return [sys.executable, "-m", module]


@dataclass
class Proc:
    """One child process with its output in files."""

    name: str
    popen: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    started_at: float  # time.monotonic() just before Popen

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def running(self) -> bool:
        return self.popen.poll() is None

    def send(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        try:
            return self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still running after {timeout_s} s; stderr:\n{self.stderr()[-3000:]}"
            ) from None

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)

    def describe(self) -> str:
        out, err = self.stdout()[-2000:], self.stderr()[-4000:]
        return f"--- {self.name} stdout:\n{out}\n--- stderr:\n{err}"


@dataclass
class Coordinator(Proc):
    grpc_port: int = 0
    http_port: int = 0
    token: str = ""

    @property
    def grpc_address(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    def get_json(self, path: str, timeout_s: float = 3.0) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout_s) as response:
            return json.loads(response.read())

    def cluster(self) -> dict[str, Any] | None:
        """GET /v1/cluster, or None while the HTTP server is not up."""
        try:
            return self.get_json("/v1/cluster")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def member(self, name: str) -> dict[str, Any] | None:
        view = self.cluster()
        matches = [m for m in (view or {}).get("agents", []) if m["name"] == name]
        assert len(matches) <= 1, f"{name} listed twice: {matches}"
        return matches[0] if matches else None

    def wait_member(self, name: str, state: str, timeout_s: float) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            m = self.member(name)
            return m if m is not None and m["state"] == state else None

        try:
            return wait_until(check, timeout_s, f"agent {name} to be {state}", interval_s=0.02)
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}; listed as {self.member(name)}\n{self.describe()}"
            ) from None

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        def up() -> bool:
            if not self.running():
                raise AssertionError(
                    f"{self.name} exited with {self.popen.returncode}\n{self.describe()}"
                )
            return self.cluster() is not None

        wait_until(up, timeout_s, f"{self.name} to serve HTTP")


@dataclass
class ProcessPool:
    """Starts processes under `root` and kills them all in `close()`."""

    root: Path
    procs: list[Proc] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
        env.update(
            EDGE_CACHE_DIR=str(self.root / "cache"),
            PYTHONUNBUFFERED="1",
            GLOO_SOCKET_IFNAME="lo",
            OMP_NUM_THREADS="1",
            **extra,
        )
        return env

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out, err = logs / f"{name}.out", logs / f"{name}.err"
        with open(out, "ab") as stdout, open(err, "ab") as stderr:
            started = time.monotonic()
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                env=env or self.env(),
                start_new_session=True,  # its own process group: killpg takes its children too
            )
        proc = Proc(name, popen, out, err, started)
        self.procs.append(proc)
        return proc

    def coordinator(
        self,
        *args: str,
        token: str | None = "test-token",
        mdns: bool = False,
        wait: bool = True,
        name: str | None = None,
        env: dict[str, str] | None = None,
    ) -> Coordinator:
        grpc_port, http_port = free_ports(2)
        argv = [
            *command("edge-coordinator"), "serve", "--model", "none",
            "--port", str(http_port), "--grpc-port", str(grpc_port), *args,
        ]  # fmt: skip
        if token is not None:
            argv += ["--token", token]
        if not mdns:
            argv.append("--no-mdns")
        base = self.start(name or unique_name("coordinator"), argv, self.env(**(env or {})))
        self.procs.remove(base)
        coord = Coordinator(
            base.name, base.popen, base.stdout_path, base.stderr_path, base.started_at,
            grpc_port=grpc_port, http_port=http_port, token=token or "",
        )  # fmt: skip
        self.procs.append(coord)
        if wait:
            coord.wait_ready()
        return coord

    def agent(
        self,
        coordinator: str | None,
        *args: str,
        token: str = "test-token",
        name: str | None = None,
        data_dir: Path | None = None,
        mdns: bool = False,
    ) -> Proc:
        name = name or unique_name("agent")
        data_dir = data_dir or self.root / "agents" / name
        argv = [
            *command("edge-agent"), "join", *([coordinator] if coordinator else []),
            "--token", token, "--name", name, "--data-dir", str(data_dir), "--threads", "1",
            *args,
        ]  # fmt: skip
        if not mdns:
            argv.append("--no-mdns")
        # Restarts reuse the name: keep each run's logs apart.
        return self.start(f"{name}-{len(self.procs)}", argv)

    def cli(
        self, tool: str, *args: str, timeout_s: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Runs a short command (e.g. `edge-coordinator status`) to completion."""
        return subprocess.run(
            [*command(tool), *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
        )

    def status(
        self, coord: Coordinator, *args: str, token: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return self.cli(
            "edge-coordinator", "status", "--coordinator", coord.grpc_address,
            "--token", coord.token if token is None else token, *args,
        )  # fmt: skip

    def close(self) -> None:
        for proc in self.procs:
            if proc.running():
                proc.send(signal.SIGTERM)  # a chance to leave cleanly
        deadline = time.monotonic() + 3.0
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            proc.kill_group()
        self.procs.clear()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessPool]:
    pool = ProcessPool(tmp_path)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture(scope="module")
def module_procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessPool]:
    pool = ProcessPool(tmp_path_factory.mktemp("procs"))
    try:
        yield pool
    finally:
        pool.close()


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "status"]):
        with contextlib.suppress(ProcessLookupError, psutil.Error):
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(p.pid)
    return found
