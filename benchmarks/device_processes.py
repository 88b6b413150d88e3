"""Processes started inside emulated devices, each stopped and its cgroups removed on exit.

`DeviceProcesses(work_dir)` is a context manager. `start(name, limits, argv)` opens
an `EmulatedDevice` called `name` (cgroup v1 memory cap, CPU quota, read throttle on
the disk holding `work_dir`) and starts `argv` inside it, in its own process group,
its output in `work_dir/NAME.log`. On exit, in reverse order of start, every process
group gets SIGTERM (all at once) then SIGKILL and every device's groups are removed, also when the
caller unwinds from an exception or Ctrl-C. `check_alive` raises, naming the process
that exited (and whether the kernel OOM-killed it) with the tail of its log; `rss`
samples each process's resident memory by kind while it runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from coordinator_process import stop_process_group
from rss_sampler import RssSampler

from edgecluster.device.emulated import DeviceLimits, EmulatedDevice


@dataclass
class DeviceProcess:
    """A process started inside its own emulated device."""

    name: str
    device: EmulatedDevice
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


def launcher(script: str, module: str) -> list[str]:
    """The venv's console script `script`, else `python -m module`."""
    path = Path(sys.executable).parent / script
    return [str(path)] if path.exists() else [sys.executable, "-m", module]


class DeviceProcesses:
    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.processes: list[DeviceProcess] = []
        self.rss = RssSampler({})  # peaks of each process's RSS by kind, while it runs
        self._stack = ExitStack()

    def __enter__(self) -> Self:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._stack.__enter__()
        try:
            self._stack.enter_context(self.rss)
        except BaseException:
            self._stack.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for p in self.processes:  # all at once: each group's grace period then overlaps
            if p.proc.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        self._stack.__exit__(exc_type, exc, tb)

    def start(
        self,
        name: str,
        limits: DeviceLimits,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
    ) -> DeviceProcess:
        """Opens device `name` and starts `argv` in it; both are undone on exit."""
        device = self._stack.enter_context(EmulatedDevice(name, limits, io_path=self.work_dir))
        log_path = self.work_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            proc = device.popen(
                list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env={**os.environ, **(env or {})},
            )  # fmt: skip
        self._stack.callback(stop_process_group, proc)
        self.rss.add(name, proc.pid)
        started = DeviceProcess(name=name, device=device, proc=proc, log_path=log_path)
        self.processes.append(started)
        return started

    def check_alive(self, names: Sequence[str] | None = None) -> None:
        """RuntimeError naming the first of `names` (default: all) that has exited."""
        for p in self.processes:
            if names is not None and p.name not in names:
                continue
            if p.proc.poll() is not None:
                oom = " (OOM-killed)" if p.device.oom_killed() else ""
                raise RuntimeError(
                    f"{p.name} exited ({p.proc.returncode}){oom}; log:\n{tail(p.log_path)}"
                )


def tail(path: Path, num_bytes: int = 2048) -> str:
    """The last `num_bytes` of a log file, decoded leniently."""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - num_bytes))
        return f.read().decode(errors="replace")
