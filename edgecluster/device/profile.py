"""Measure the device an agent runs on, in well under a second.

Cores (respecting affinity and a cgroup CPU quota), memory (respecting a cgroup
memory limit), free disk, sequential disk read speed (direct I/O, bypassing the
page cache where the filesystem allows) and matmul GFLOPS.

`light_profile` needs no torch (this module imports it only inside the functions
that compute): an agent joins with it at once and sends `profile_device`'s full
measurement once torch is loaded. A light profile has matmul_gflops 0, which the
coordinator reads as "still profiling".
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import mmap
import os
import shutil
import time
from pathlib import Path

import psutil

from edgecluster.types import DeviceProfile

log = logging.getLogger(__name__)

_PROBE_BYTES = 64 << 20
_PIECE_BYTES = 1 << 20


def cgroup_cpu_quota() -> float | None:
    """CPUs allowed by a cgroup v1/v2 CFS quota on this process, if any."""
    try:
        quota = int(Path(_cgroup_file("cpu", "cpu.cfs_quota_us")).read_text())
        period = int(Path(_cgroup_file("cpu", "cpu.cfs_period_us")).read_text())
        return quota / period if quota > 0 else None
    except (OSError, ValueError):
        return None


def cgroup_memory_limit() -> int | None:
    try:
        limit = int(Path(_cgroup_file("memory", "memory.limit_in_bytes")).read_text())
    except (OSError, ValueError):
        return None
    return limit if limit < (1 << 60) else None


def _cgroup_file(controller: str, name: str) -> str:
    """Path of a cgroup v1 control file of this process's group."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return f"/sys/fs/cgroup/{controller}{path}/{name}"
    raise OSError(f"no cgroup v1 {controller} controller")


def effective_cpus() -> float:
    cores = float(len(os.sched_getaffinity(0)))
    quota = cgroup_cpu_quota()
    return min(cores, quota) if quota else cores


def default_threads() -> int:
    return max(1, math.floor(effective_cpus()))


def measure_disk_read(directory: Path, budget_s: float = 0.3) -> float:
    """Sequential read bytes/s of a probe file in `directory` (kept for next time).

    Reads up to 64 MiB with direct I/O, stopping after `budget_s`: enough to get past
    the burst a read throttle allows before it bites.
    """
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / ".read-probe"
    if not probe.exists() or probe.stat().st_size != _PROBE_BYTES:
        with open(probe, "wb") as f:
            f.write(os.urandom(_PIECE_BYTES) * (_PROBE_BYTES // _PIECE_BYTES))
            f.flush()
            os.fsync(f.fileno())
    try:
        fd = os.open(probe, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    except OSError:  # filesystems without direct I/O (tmpfs): drop our pages instead
        fd = os.open(probe, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        buf = mmap.mmap(-1, _PIECE_BYTES)  # page-aligned, as O_DIRECT needs
        start = time.perf_counter()
        total = 0
        while time.perf_counter() - start < budget_s and (n := os.readv(fd, [buf])) > 0:
            total += n
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
    return total / max(elapsed, 1e-6)


def measure_matmul_gflops(size: int = 256, budget_s: float = 0.15) -> float:
    """Speed of the fastest of many short matmuls.

    Busy neighbours and CPU quotas only ever stretch a run, so the fastest one is the
    device's own speed: repeatable whatever else is running at start.
    """
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    fastest, deadline = float("inf"), time.perf_counter() + budget_s
    while (now := time.perf_counter()) < deadline:
        torch.mm(a, b)
        fastest = min(fastest, time.perf_counter() - now)
    return 2 * size**3 / fastest / 1e9


def detect_accelerator() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "none"


def remember_best(data_dir: Path, **measured: float) -> dict[str, float]:
    """The best of this and earlier measurements of the device, kept in its data dir.

    Busy neighbours only ever make a measurement lower, so the best one is the
    device's; it keeps a restarted agent's plan, and so its shard cache, stable.
    """
    path = data_dir / "profile.json"
    try:
        seen = json.loads(path.read_text())
    except (OSError, ValueError):
        seen = {}
    best = {
        k: max(v, float(seen[k])) if isinstance(seen.get(k), int | float) else v
        for k, v in measured.items()
    }
    with contextlib.suppress(OSError):
        path.write_text(json.dumps(best))
    return best


def _memory() -> tuple[int, int]:
    """(total, available) bytes, within a cgroup memory limit."""
    mem = psutil.virtual_memory()
    total, available = mem.total, mem.available
    cg_limit = cgroup_memory_limit()
    if cg_limit:
        total, available = min(total, cg_limit), min(available, cg_limit)
    return total, available


def light_profile(data_dir: Path, memory_limit_bytes: int = 0) -> DeviceProfile:
    """What costs nothing to know (cores, memory, disk space): the profile an agent
    joins with before it loads torch. No speeds are measured (matmul_gflops 0)."""
    total, available = _memory()
    return DeviceProfile(
        cpu_count=max(1, math.ceil(effective_cpus())),
        memory_total_bytes=total,
        memory_available_bytes=available,
        disk_free_bytes=shutil.disk_usage(data_dir if data_dir.exists() else "/").free,
        disk_read_bytes_per_s=0.0,
        matmul_gflops=0.0,
        memory_limit_bytes=memory_limit_bytes,
        runtime_rss_bytes=psutil.Process().memory_info().rss,
        cpu_limit=cgroup_cpu_quota() or 0.0,
    )


def profile_device(data_dir: Path, memory_limit_bytes: int = 0) -> DeviceProfile:
    import torch

    total, available = _memory()
    start = time.perf_counter()
    quota = cgroup_cpu_quota()
    # A quota lets each period run at full speed briefly: scale the burst rate by the
    # share of our threads the quota keeps busy.
    quota_share = min(1.0, quota / torch.get_num_threads()) if quota else 1.0
    best = remember_best(
        data_dir,
        matmul_gflops_burst=measure_matmul_gflops(),
        disk_read_bytes_per_s=measure_disk_read(data_dir),
    )
    profile = DeviceProfile(
        cpu_count=max(1, math.ceil(effective_cpus())),
        memory_total_bytes=total,
        memory_available_bytes=available,
        disk_free_bytes=shutil.disk_usage(data_dir if data_dir.exists() else "/").free,
        disk_read_bytes_per_s=best["disk_read_bytes_per_s"],
        matmul_gflops=best["matmul_gflops_burst"] * quota_share,
        accelerator=detect_accelerator(),
        memory_limit_bytes=memory_limit_bytes,
        runtime_rss_bytes=psutil.Process().memory_info().rss,
        cpu_limit=quota or 0.0,
    )
    log.info("profiled device in %.2f s: %s", time.perf_counter() - start, profile)
    return profile
