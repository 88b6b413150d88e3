"""One `edge-coordinator train` run over agents that each run as an emulated device.

`run_schedule(run, settings, cluster, ...)` starts the coordinator (a device with a
memory cap and no CPU quota: it holds no stage) and one `edge-agent join` per
device of the cluster file, named as the file names it, inside a device with that
entry's `memory` cap and, once the agent's compute is ready, its `cpu_quota`
(cgroup v1, device_processes.py; `QuotaAfterReady` says why not from the start). The
coordinator reads the same file (`--cluster`), so it plans with the devices'
speeds and links and emulates each link's latency and bandwidth on the data
channel. It waits for the log's {"event": "done"} line, reads every agent's peak
RSS (VmHWM) while they still live, and stops and removes everything, also on a
failure, a timeout or Ctrl-C. Cgroup names start with CGROUP_PREFIX, so a crashed
run's leftovers are found by name (`cleanup_stale`).
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import free_tcp_port, peak_rss_bytes
from coordinator_process import stop_process_group
from device_processes import DeviceProcess, DeviceProcesses, launcher, tail
from training_report import read_log

from edgecluster.device.emulated import DeviceLimits
from edgecluster.plan.cluster_file import ClusterSpec

HOST = "127.0.0.1"
TOKEN = "bench-training-token"
CGROUP_PREFIX = "train-"
COORDINATOR_MEMORY_BYTES = 2 << 30
PROGRESS_EVERY_S = 15.0
POLL_S = 0.5
READY_MARK = "compute ready in"  # edgecluster.runtime.agent, once torch is up


@dataclass(frozen=True, kw_only=True)
class ScheduleRun:
    """One row of the benchmark: a name and the schedule flags behind it."""

    name: str  # "skippipe-33"
    schedule: str  # --schedule
    skip_ratio: float


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """What every schedule shares: model, data, batch shape, steps, seed."""

    model_config: Path
    data: Path
    micro_batch: int
    num_micro_batches: int
    seq_len: int
    num_steps: int
    lr: float
    seed: int
    eval_every: int
    num_stages: int | None
    max_swaps: int
    timeout_s: float

    def __post_init__(self) -> None:
        for name in ("micro_batch", "num_micro_batches", "seq_len", "num_steps", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_stages is not None and self.num_stages < 2:
            raise ValueError(f"--stages must be >= 2, got {self.num_stages}")


@dataclass
class RunOutcome:
    steps: list[dict[str, Any]]
    checkpoint: Path | None
    peak_rss_bytes: dict[str, int]
    training_view: Any  # GET /v1/training once training ran, or None
    wall_s: float


def coordinator_argv(
    run: ScheduleRun, s: TrainSettings, cluster_file: Path, out_dir: Path, ports: tuple[int, int]
) -> list[str]:
    """The `edge-coordinator train` command line of one run (the CLI contract)."""
    http_port, grpc_port = ports
    stages = ["--stages", str(s.num_stages)] if s.num_stages else []
    return [
        *launcher("edge-coordinator", "coordinator.cli"), "train",
        "--model", str(s.model_config), "--data", str(s.data),
        "--no-mdns", "--token", TOKEN, "--min-agents", str(_num_devices(cluster_file)),
        "--grpc-port", str(grpc_port), "--port", str(http_port), "--http-host", HOST,
        "--cluster", str(cluster_file), "--schedule", run.schedule, *stages,
        "--skip-ratio", str(run.skip_ratio), "--max-swaps", str(s.max_swaps),
        "--micro-batch", str(s.micro_batch), "--micro-batches", str(s.num_micro_batches),
        "--seq-len", str(s.seq_len), "--steps", str(s.num_steps), "--lr", str(s.lr),
        "--seed", str(s.seed), "--eval-every", str(s.eval_every),
        "--checkpoint-dir", str(out_dir / "checkpoints"),
        "--log-json", str(out_dir / "log.jsonl"), "--no-progress",
    ]  # fmt: skip


def agent_argv(name: str, memory_bytes: int, grpc_port: int, data_dir: Path) -> list[str]:
    return [
        *launcher("edge-agent", "agents.cli"), "join", f"{HOST}:{grpc_port}",
        "--name", name, "--token", TOKEN, "--no-mdns", "--threads", "1",
        "--memory-limit", str(memory_bytes), "--data-dir", str(data_dir),
    ]  # fmt: skip


def _num_devices(cluster_file: Path) -> int:
    return len(json.loads(cluster_file.read_text())["devices"])


def run_schedule(
    run: ScheduleRun,
    settings: TrainSettings,
    cluster: ClusterSpec,
    cluster_file: Path,
    work_dir: Path,
    say: Callable[[str], None],
) -> RunOutcome:
    """Trains `settings.num_steps` steps of `run` on the emulated cluster; its figures."""
    out_dir = work_dir / run.name
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "log.jsonl"
    log_path.unlink(missing_ok=True)
    ports = (free_tcp_port(HOST), free_tcp_port(HOST))
    tag = f"{CGROUP_PREFIX}{run.name}"
    started = time.monotonic()
    with DeviceProcesses(out_dir) as devices:
        coordinator = devices.start(
            f"{tag}-coordinator",
            DeviceLimits(memory_bytes=COORDINATOR_MEMORY_BYTES),
            coordinator_argv(run, settings, cluster_file, out_dir, ports),
        )
        agents, quotas = {}, QuotaAfterReady()
        for spec in cluster.devices:
            limits = DeviceLimits(memory_bytes=spec.memory_bytes)  # its quota once ready
            argv = agent_argv(spec.name, spec.memory_bytes, ports[1], out_dir / spec.name)
            agents[spec.name] = devices.start(f"{tag}-{spec.name}", limits, argv)
            quotas.add(agents[spec.name], spec.cpu_quota)
        view = _wait_done(run, settings, devices, coordinator, quotas, log_path, ports[0], say)
        peaks = {}
        for name, agent in agents.items():
            if agent.proc.poll() is None:
                peaks[name] = peak_rss_bytes(agent.pid)
            else:  # gone already: the sampler's peak of its resident kinds
                peaks[name] = sum(devices.rss.peaks.get(agent.name, {}).values())
        stop_process_group(coordinator.proc)  # first, or it re-plans as agents leave
    steps, done = read_log(log_path)
    checkpoint = Path(done["checkpoint"]) if done and done.get("checkpoint") else None
    return RunOutcome(
        steps=steps,
        checkpoint=checkpoint,
        peak_rss_bytes=peaks,
        training_view=view,
        wall_s=time.monotonic() - started,
    )


def _wait_done(
    run: ScheduleRun,
    settings: TrainSettings,
    devices: DeviceProcesses,
    coordinator: DeviceProcess,
    quotas: QuotaAfterReady,
    log_path: Path,
    http_port: int,
    say: Callable[[str], None],
) -> Any:
    """Until the log says done; progress meanwhile; GET /v1/training once steps come."""
    started = time.monotonic()
    last_report, view = started, None
    agents = [p.name for p in devices.processes if p is not coordinator]
    while time.monotonic() - started < settings.timeout_s:
        exited = coordinator.proc.poll() is not None
        steps, done = read_log(log_path)
        if done is not None:
            return view
        if exited:
            raise RuntimeError(
                f"{run.name}: the coordinator exited ({coordinator.proc.returncode}) before "
                f"its log said done; its log:\n{tail(coordinator.log_path, 4096)}"
            )
        quotas.apply(everyone=bool(steps))
        if view is None and steps:
            view = _training_view(http_port)
        if time.monotonic() - last_report >= PROGRESS_EVERY_S:
            last_report = time.monotonic()
            say(f"  {run.name} {time.monotonic() - started:4.0f} s: {_progress(steps, settings)}")
        devices.check_alive(agents)  # an agent that dies fails the run: this is no fault test
        time.sleep(POLL_S)
    raise TimeoutError(
        f"{run.name} did not finish {settings.num_steps} steps in {settings.timeout_s:.0f} s; "
        f"coordinator log:\n{tail(coordinator.log_path)}"
    )


class QuotaAfterReady:
    """Each agent's CPU quota, written once its log says its compute is ready.

    An agent joins, then imports torch and profiles itself; under 0.1 CPU on a busy
    2-core box that took 95 s. Agents therefore start with their memory cap only and
    get their quota when they log READY_MARK, or at the latest when the first step
    is logged (that step is warm-up, left out of the medians).
    """

    def __init__(self) -> None:
        self._pending: dict[str, tuple[DeviceProcess, float]] = {}

    def add(self, process: DeviceProcess, cpus: float) -> None:
        self._pending[process.name] = (process, cpus)

    def apply(self, *, everyone: bool = False) -> None:
        for name, (process, cpus) in list(self._pending.items()):
            if everyone or READY_MARK in process.log_path.read_text(errors="replace"):
                process.device.set_cpus(cpus)
                del self._pending[name]


def _progress(steps: list[dict[str, Any]], settings: TrainSettings) -> str:
    if not steps:
        return "starting (agents joining, plan, first step)"
    last = steps[-1]
    return (
        f"step {last['step']}/{settings.num_steps}, loss {last['loss']:.3f}, "
        f"iteration {last['iteration_s']:.2f} s"
    )


def _training_view(http_port: int) -> Any:
    """GET /v1/training (the plan, progress, per-agent figures), or None if it fails."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{http_port}/v1/training", timeout=5) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None
