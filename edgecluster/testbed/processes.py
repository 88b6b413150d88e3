"""Processes the testbed starts: how their command line and environment are built, and how
they are found again and stopped.

A process is recorded as (pid, start time): a pid alone may be reused by an
unrelated process once ours has exited, and we only ever signal our own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from edgecluster.testbed.compose import Service

VENV_BIN = Path(sys.executable).parent


@dataclass(frozen=True, kw_only=True)
class ProcessRecord:
    pid: int
    start_time: int  # clock ticks since boot, field 22 of /proc/<pid>/stat


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2 :].split()  # fields from 3 (state) on


def record(pid: int) -> ProcessRecord:
    fields = _stat_fields(pid)
    if fields is None:
        raise ProcessLookupError(f"process {pid} exited before it could be recorded")
    return ProcessRecord(pid=pid, start_time=int(fields[19]))


def is_alive(process: ProcessRecord) -> bool:
    """Still running (not a zombie) and still the process we started."""
    fields = _stat_fields(process.pid)
    return fields is not None and fields[0] != "Z" and int(fields[19]) == process.start_time


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # when it is our child (in-process use); else init reaps


def stop(processes: Iterable[ProcessRecord], grace_s: float = 5.0) -> None:
    """SIGTERM each one's process group, SIGKILL what is left after `grace_s`."""
    alive = [process for process in processes if is_alive(process)]
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for process in alive:
            _signal_group(process.pid, sig)
        deadline = time.monotonic() + wait_s
        while alive and time.monotonic() < deadline:
            for process in alive:
                _reap(process.pid)
            alive = [process for process in alive if is_alive(process)]
            time.sleep(0.05)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    # each service leads its own session, so its group holds its children too
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def kill_pids(pids: Iterable[int]) -> None:
    """SIGKILL pids found in a namespace we own (`ip netns pids`)."""
    for pid in pids:
        if pid != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def resolve_program(program: str) -> str:
    """`program` from this interpreter's venv when it is there, else from PATH."""
    if "/" in program:
        return program
    candidate = VENV_BIN / program
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(program)
    if found is None:
        raise FileNotFoundError(
            f"program {program!r} is neither in {VENV_BIN} nor on PATH; install the "
            "package into this venv (make install) or fix the service's command"
        )
    return found


def service_environment(
    service: Service, extra: Mapping[str, str], base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Host environment, then the service's, then `extra`; the venv's bin first on PATH."""
    env = dict(os.environ if base is None else base)
    env.update(service.environment)
    env.update(extra)
    env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", os.defpath)])
    return env
