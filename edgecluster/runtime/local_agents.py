"""`--local N`: agents as child processes on 127.0.0.1, stopped with the coordinator.

Each child asks the kernel to SIGTERM it if the coordinator dies (PR_SET_PDEATHSIG),
so no orphan is left even after a SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class LocalAgents:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        count: int,
        *,
        coordinator: str,
        token: str,
        data_root: Path,
        threads: int,
        extra_args: list[str] | None = None,
    ) -> None:
        env = {**os.environ, "EDGE_TOKEN": token}
        for i in range(count):
            name = f"local-{i}"
            argv = [
                sys.executable, "-m", "agents.cli", "join", coordinator,
                "--name", name, "--host", "127.0.0.1", "--no-mdns",
                "--data-dir", str(data_root / name), "--threads", str(threads),
                *(extra_args or []),
            ]  # fmt: skip
            self.procs.append(subprocess.Popen(argv, env=env, preexec_fn=_die_with_parent))
        log.info("started %d local agents", count)

    def stop(self, timeout_s: float = 5.0) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
