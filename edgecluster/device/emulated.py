"""Run processes as an emulated small device: cgroup v1 limits on memory, CPU and disk reads.

`EmulatedDevice` owns the groups `edgecluster/<name>` under the memory, cpu and
blkio hierarchies. A process started with `popen` is inside every group before
it runs a single instruction of the command, so its first allocation already
counts. Memory is capped without swap (memsw), CPU by a CFS quota, reads by a
per-disk bytes/s throttle. Needs root; `available()` says why it cannot run.

    with EmulatedDevice("pi", DeviceLimits(memory_bytes=550 << 20, cpus=0.45)) as dev:
        dev.popen(["edge-agent", "join"]).wait()
        print(dev.peak_memory_bytes(), dev.oom_killed())

CLI: python -m edgecluster.device.emulated --memory 550MiB --cpus 0.45 -- cmd args
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from edgecluster.device import block, cgroup_v1
from edgecluster.units import format_bytes, parse_size

logger = logging.getLogger(__name__)

CFS_PERIOD_US = 100_000
MIN_CFS_QUOTA_US = 1_000
MIN_MEMORY_BYTES = 4 << 20
_REQUIRED_FILES = {
    "memory": "memory.limit_in_bytes",
    "cpu": "cpu.cfs_quota_us",
    "blkio": "blkio.throttle.read_bps_device",
}


@dataclass(frozen=True, kw_only=True)
class DeviceLimits:
    """What the emulated device has; None leaves that resource unlimited.

    `device` is the block device whose reads are throttled ("/dev/vda" or "254:0");
    by default the whole disk holding the device's `io_path`.
    """

    memory_bytes: int | None = None
    cpus: float | None = None
    read_bytes_per_s: int | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        if self.memory_bytes is not None and self.memory_bytes < MIN_MEMORY_BYTES:
            raise ValueError(
                f"memory_bytes={self.memory_bytes} is too small to start a process; "
                f"give at least {MIN_MEMORY_BYTES} (4 MiB)"
            )
        if self.cpus is not None and self.cpus * CFS_PERIOD_US < MIN_CFS_QUOTA_US:
            raise ValueError(f"cpus={self.cpus} is below the kernel minimum; give >= 0.01")
        if self.read_bytes_per_s is not None and self.read_bytes_per_s <= 0:
            raise ValueError(f"read_bytes_per_s={self.read_bytes_per_s} must be positive")


def available(root: Path = cgroup_v1.CGROUP_ROOT) -> str | None:
    """None when emulated devices work here, else the reason they do not."""
    if os.geteuid() != 0:
        return "emulated devices need root (cgroup v1 writes)"
    for controller, probe in _REQUIRED_FILES.items():
        if not (root / controller / probe).exists():
            return f"cgroup v1 controller {controller!r} is not mounted at {root / controller}"
        if not os.access(root / controller, os.W_OK):
            return f"{root / controller} is not writable"
    return None


def drop_page_cache() -> None:
    """Write dirty pages, then drop the clean page cache (root): cold-disk benchmarks."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1\n")


def cleanup_stale(prefix: str = "", root: Path = cgroup_v1.CGROUP_ROOT) -> list[str]:
    """Remove every `edgecluster/<prefix>*` group left by a crashed run; their names."""
    names = {
        name
        for controller in cgroup_v1.CONTROLLERS
        for name in cgroup_v1.list_groups(controller, root)
        if name.startswith(prefix)
    }
    for name in sorted(names):
        cgroup_v1.remove_named(name, root)
    if names:
        logger.info("removed stale emulated devices %s", sorted(names))
    return sorted(names)


class EmulatedDevice:
    """Named cgroups with `limits`; `open()` creates them, `close()` empties and removes them."""

    def __init__(
        self,
        name: str,
        limits: DeviceLimits,
        *,
        io_path: str | os.PathLike[str] = ".",
        root: Path = cgroup_v1.CGROUP_ROOT,
    ) -> None:
        self.name = cgroup_v1.check_name(name)
        self.limits = limits
        self.io_path = Path(io_path)
        self.root = root
        self.paths = {c: cgroup_v1.group_path(c, name, root) for c in cgroup_v1.CONTROLLERS}

    def open(self) -> Self:
        reason = available(self.root)
        if reason is not None:
            raise PermissionError(f"cannot emulate device {self.name!r}: {reason}")
        try:
            for controller in cgroup_v1.CONTROLLERS:
                cgroup_v1.create_group(controller, self.name, self.root)
            self._write_limits()
        except BaseException:
            self.close()
            raise
        logger.info("emulated device %s: %s", self.name, self.limits)
        return self

    def _write_limits(self) -> None:
        limits = self.limits
        if limits.memory_bytes is not None:
            memory = self.paths["memory"]
            cgroup_v1.write_value(memory, "memory.limit_in_bytes", limits.memory_bytes)
            if (memory / "memory.memsw.limit_in_bytes").exists():
                cgroup_v1.write_value(memory, "memory.memsw.limit_in_bytes", limits.memory_bytes)
        if limits.cpus is not None:
            self.set_cpus(limits.cpus)
        if limits.read_bytes_per_s is not None:
            major, minor = self.block_device()
            rule = f"{major}:{minor} {limits.read_bytes_per_s}"
            cgroup_v1.write_value(self.paths["blkio"], "blkio.throttle.read_bps_device", rule)

    def set_cpus(self, cpus: float | None) -> None:
        """Change the CPU quota, also while processes run in the device (None: unlimited)."""
        if cpus is not None and cpus * CFS_PERIOD_US < MIN_CFS_QUOTA_US:
            raise ValueError(f"cpus={cpus} is below the kernel minimum; give >= 0.01")
        quota = -1 if cpus is None else round(cpus * CFS_PERIOD_US)
        cgroup_v1.write_value(self.paths["cpu"], "cpu.cfs_period_us", CFS_PERIOD_US)
        cgroup_v1.write_value(self.paths["cpu"], "cpu.cfs_quota_us", quota)

    def block_device(self) -> block.DeviceNumber:
        """Whole disk whose reads are throttled: `limits.device`, else the one under io_path."""
        if self.limits.device is not None:
            return block.whole_disk(block.parse_device(self.limits.device))
        return block.disk_holding(self.io_path)

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def add_pid(self, pid: int) -> None:
        """Move process `pid` (all its threads) into every group of this device."""
        for group in self.paths.values():
            cgroup_v1.write_value(group, "cgroup.procs", pid)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start `argv` inside the device; kwargs go to subprocess.Popen.

        The child joins the groups between fork and exec (a preexec_fn), so nothing
        it runs escapes the limits.
        """
        if not self.paths["memory"].is_dir():
            raise RuntimeError(f"device {self.name!r} is not open: call open() or use `with`")
        kwargs["preexec_fn"] = _join_groups_then(
            [str(group / "cgroup.procs") for group in self.paths.values()],
            kwargs.get("preexec_fn"),
        )
        return subprocess.Popen(list(argv), **kwargs)

    def pids(self) -> list[int]:
        return cgroup_v1.group_pids(self.paths["memory"])

    def peak_memory_bytes(self) -> int:
        """Highest memory charge seen (v1 counts page cache as well as anonymous memory)."""
        return int(cgroup_v1.read_value(self.paths["memory"], "memory.max_usage_in_bytes"))

    def memory_failcnt(self) -> int:
        """How often the memory limit was hit (each time the kernel had to reclaim)."""
        return int(cgroup_v1.read_value(self.paths["memory"], "memory.failcnt"))

    def oom_killed(self) -> bool:
        """True when the kernel OOM-killed a process of this device."""
        control = cgroup_v1.read_value(self.paths["memory"], "memory.oom_control")
        for line in control.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value) > 0
        return self.memory_failcnt() > 0  # old kernels: hitting the limit is the best sign

    def close(self) -> None:
        """Kill leftover processes and remove the groups; safe to call twice."""
        cgroup_v1.remove_named(self.name, self.root)


def _join_groups_then(
    procs_files: list[str], then: Callable[[], object] | None
) -> Callable[[], None]:
    def preexec() -> None:  # runs in the child between fork and exec
        pid = str(os.getpid()).encode()
        for path in procs_files:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)
        if then is not None:
            then()

    return preexec


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m edgecluster.device.emulated",
        description="Run a command as an emulated small device; print its peak memory.",
    )
    parser.add_argument("--memory", type=parse_size, help="memory cap, e.g. 550MiB (no swap)")
    parser.add_argument("--cpus", type=float, help="CPU share, e.g. 0.45 of one core")
    parser.add_argument("--read-bps", type=parse_size, help="disk read limit per second, 200MB")
    parser.add_argument("--device", help="block device to throttle (default: disk of --io-path)")
    parser.add_argument("--io-path", default=".", help="path whose disk is throttled")
    parser.add_argument("--name", default=f"cli-{os.getpid()}", help="cgroup name")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- command args...")
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        parser.error("give the command to run after --")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    limits = DeviceLimits(
        memory_bytes=args.memory, cpus=args.cpus, read_bytes_per_s=args.read_bps, device=args.device
    )
    with EmulatedDevice(args.name, limits, io_path=args.io_path) as device:
        proc = device.popen(args.command)
        forward = lambda signum, _frame: proc.send_signal(signum)  # noqa: E731
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, forward)
        returncode = proc.wait()
        peak = device.peak_memory_bytes()
        oom = device.oom_killed()
    print(
        f"peak memory: {format_bytes(peak)} ({peak} bytes); oom-killed: {'yes' if oom else 'no'}",
        file=sys.stderr,
    )
    return returncode if returncode >= 0 else 128 - returncode


if __name__ == "__main__":
    sys.exit(main())
