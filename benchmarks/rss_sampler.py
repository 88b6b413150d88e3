"""Peaks of a process's resident memory by kind, sampled from /proc/PID/status.

VmHWM (the kernel's peak RSS) counts every resident page the process maps:
its own anonymous memory, but also file pages it maps (a memory-mapped checkpoint,
the shared libraries of torch) that may be charged to another cgroup. `RssSampler`
polls RssAnon / RssFile / RssShmem of some processes on a thread and keeps the
highest of each, so a report can say what a VmHWM above a cap was made of.
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import TracebackType
from typing import Self

FIELDS = {"RssAnon:": "anon", "RssFile:": "file", "RssShmem:": "shmem"}


def rss_by_kind(pid: int) -> dict[str, int]:
    """Current resident bytes of `pid` by kind ({} once the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key = line.split(":", 1)[0] + ":"
        if key in FIELDS:
            out[FIELDS[key]] = int(line.split()[1]) * 1024  # the kernel reports kB
    return out


class RssSampler:
    """`with RssSampler({"name": pid}) as s: ...; s.peaks` -> name -> {"anon": .., ...}."""

    def __init__(self, pids: dict[str, int], interval_s: float = 0.25) -> None:
        self._pids = dict(pids)
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._peaks: dict[str, dict[str, int]] = {name: {} for name in pids}
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()

    def add(self, name: str, pid: int) -> None:
        with self._lock:
            self._pids[name] = pid
            self._peaks.setdefault(name, {})

    @property
    def peaks(self) -> dict[str, dict[str, int]]:
        self.sample()
        with self._lock:
            return {name: dict(kinds) for name, kinds in self._peaks.items()}

    def sample(self) -> None:
        with self._lock:
            pids = dict(self._pids)
        for name, pid in pids.items():
            now = rss_by_kind(pid)
            with self._lock:
                peak = self._peaks[name]
                for kind, value in now.items():
                    peak[kind] = max(peak.get(kind, 0), value)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.sample()
