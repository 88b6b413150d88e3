"""An edgecluster coordinator and its agents on loopback, each process its own emulated device.

`EmulatedCluster(layout)` is a context manager: it opens one `EmulatedDevice` per
process (cgroup v1 memory cap, CPU quota, read throttle on the disk holding the
work dir), starts `edge-coordinator serve` and `edge-agent join` inside them, each
in its own process group, and on exit stops every process group and removes every
cgroup. `wait_ready` polls `/health`, reporting the coordinator's state and its
shard-distribution progress meanwhile; `rss` samples each process's resident
memory by kind (anonymous, file-backed) while it runs.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from common import free_tcp_port
from coordinator_process import CoordinatorProcess, stop_process_group
from device_processes import DeviceProcess, DeviceProcesses, launcher, tail
from rss_sampler import RssSampler

from edgecluster.device.emulated import DeviceLimits

HOST = "127.0.0.1"
TOKEN = "bench-streaming-token"
PROGRESS_EVERY_S = 15.0
_TQDM_PIECE = re.compile(r"distributing shards[^\r\n\]]*\]")


@dataclass(frozen=True, kw_only=True)
class ClusterLayout:
    """What to start: `num_agents` agents of `agent_limits`, a coordinator of its own limits."""

    tag: str  # prefix of the cgroup names and of the agents' names
    model_dir: Path
    work_dir: Path  # agents' data dirs (on the throttled disk) and logs
    num_agents: int
    agent_limits: DeviceLimits
    coordinator_limits: DeviceLimits
    max_context: int = 256
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.num_agents < 1:
            raise ValueError(f"a cluster needs at least one agent, got {self.num_agents}")
        if not self.agent_limits.memory_bytes:
            raise ValueError("agents need a memory cap: it is their --memory-limit")

    def agent_name(self, index: int) -> str:
        return f"{self.tag}-agent-{index}"


class EmulatedCluster:
    def __init__(self, layout: ClusterLayout) -> None:
        self.layout = layout
        self.http_port, self.grpc_port = free_tcp_port(HOST), free_tcp_port(HOST)
        self.coordinator: DeviceProcess | None = None
        self.agents: list[DeviceProcess] = []
        self._devices = DeviceProcesses(layout.work_dir)

    @property
    def rss(self) -> RssSampler:
        """Peaks of each process's RSS by kind, while it runs."""
        return self._devices.rss

    def __enter__(self) -> Self:
        self._devices.__enter__()
        try:
            self.coordinator = self._start("coordinator", self._coordinator_argv())
            for i in range(self.layout.num_agents):
                name = self.layout.agent_name(i)
                self.agents.append(self._start(name, self._agent_argv(i)))
        except BaseException:
            self._devices.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.coordinator is not None:  # first, or it re-plans as each agent leaves
            stop_process_group(self.coordinator.proc)
        self._devices.__exit__(exc_type, exc, tb)

    def _start(self, role: str, argv: list[str]) -> DeviceProcess:
        """Opens the role's device and starts `argv` in it; both are undone on exit."""
        layout = self.layout
        limits = layout.coordinator_limits if role == "coordinator" else layout.agent_limits
        name = role if role.startswith(layout.tag) else f"{layout.tag}-{role}"
        cache = {"EDGE_CACHE_DIR": str(layout.work_dir / "coordinator-cache")}
        return self._devices.start(name, limits, argv, env=cache)

    def _coordinator_argv(self) -> list[str]:
        layout = self.layout
        memory = layout.coordinator_limits.memory_bytes
        limit = ["--memory-limit", str(memory)] if memory else []
        return [
            *launcher("edge-coordinator", "coordinator.cli"), "serve",
            "--model", str(layout.model_dir), "--min-agents", str(layout.num_agents),
            "--no-mdns", "--dtype", layout.dtype, "--storage-dtype", layout.dtype,
            "--max-context", str(layout.max_context), "--host", HOST,
            "--port", str(self.http_port), "--grpc-port", str(self.grpc_port),
            "--token", TOKEN, *limit,
        ]  # fmt: skip

    def _agent_argv(self, index: int) -> list[str]:
        layout = self.layout
        name = layout.agent_name(index)
        return [
            *launcher("edge-agent", "agents.cli"), "join", f"{HOST}:{self.grpc_port}",
            "--token", TOKEN, "--no-mdns", "--name", name,
            "--data-dir", str(layout.work_dir / name),
            "--memory-limit", str(layout.agent_limits.memory_bytes), "--threads", "1",
        ]  # fmt: skip

    @property
    def server(self) -> CoordinatorProcess:
        assert self.coordinator is not None, "the cluster is not started"
        return CoordinatorProcess(self.coordinator.proc, self.http_port, self.coordinator.log_path)

    def processes(self) -> list[DeviceProcess]:
        return [p for p in (self.coordinator, *self.agents) if p is not None]

    def wait_ready(self, timeout_s: float, say: Callable[[str], None]) -> float:
        """Seconds until /health said 200; reports progress every PROGRESS_EVERY_S."""
        server, started = self.server, time.monotonic()
        last_report = started
        while time.monotonic() - started < timeout_s:
            self._check_alive()
            status, state = _health(server)
            if status == 200:
                return time.monotonic() - started
            if time.monotonic() - last_report >= PROGRESS_EVERY_S:
                last_report = time.monotonic()
                say(f"  {time.monotonic() - started:4.0f} s: {state}{self._progress()}")
            time.sleep(0.5)
        raise TimeoutError(f"the cluster was not ready in {timeout_s:.0f} s; {server.tail()}")

    def _check_alive(self) -> None:
        self._devices.check_alive()

    def _progress(self) -> str:
        assert self.coordinator is not None
        pieces = _TQDM_PIECE.findall(tail(self.coordinator.log_path, 4096))
        return f" [{pieces[-1].strip()}]" if pieces else ""


def _health(server: CoordinatorProcess) -> tuple[int, str]:
    try:
        status, body = server.get_json("/health")
    except (OSError, ValueError):
        return 0, "starting"
    state = body.get("state") if isinstance(body, dict) else None
    return status, str(state or body)
