"""One agent per data dir: an exclusive flock held for the life of the process.

`lock_data_dir(dir)` takes `dir/agent.lock` (flock, non-blocking) and keeps it until
the process exits, so the kernel releases it even after a SIGKILL; asking again for a
dir this process already holds returns the held lock. A dir held by another process
raises DataDirInUse, whose message names the dir and the fix.

`first_free_data_dir(base, name)` is for agents started without --name or --data-dir:
it takes `base/name`, else `base/name-2`, `base/name-3`, ... (and the name to match),
locking the one it returns. Light on purpose: the agent CLI calls it before its heavy
imports.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from pathlib import Path

LOCK_FILE = "agent.lock"
MAX_SIBLINGS = 64

_held: dict[Path, int] = {}  # resolved dir -> open fd holding its flock
_guard = threading.Lock()


class DataDirInUse(Exception):
    """Another live process holds this data dir."""

    def __init__(self, data_dir: Path, holder: str) -> None:
        super().__init__(
            f"the data dir {data_dir} is in use by another agent{holder}; give this agent "
            "its own --name or --data-dir (or stop the other one)"
        )
        self.data_dir = data_dir


def lock_data_dir(data_dir: Path) -> Path:
    """Holds `data_dir` for this process (creating it); DataDirInUse if another does."""
    data_dir.mkdir(parents=True, exist_ok=True)
    key = data_dir.resolve()
    with _guard:
        if key in _held:
            return key
        fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise DataDirInUse(data_dir, holder) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _held[key] = fd
        return key


def data_dir_in_use(data_dir: Path) -> bool:
    """True when another process holds `data_dir` now (a snapshot: it may change)."""
    if not (data_dir / LOCK_FILE).exists():
        return False
    try:
        fd = os.open(data_dir / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's lock
    return False


def first_free_data_dir(base: Path, name: str) -> tuple[str, Path]:
    """(name, dir) of the first of base/name, base/name-2, ... that this process could
    lock; the dir is locked on return."""
    for index in range(1, MAX_SIBLINGS + 1):
        candidate = name if index == 1 else f"{name}-{index}"
        with contextlib.suppress(DataDirInUse):
            return candidate, lock_data_dir(base / candidate)
    raise DataDirInUse(base / f"{name}-*", f" ({MAX_SIBLINGS} agents named {name} already)")


def release_data_dir(data_dir: Path) -> None:
    """Lets `data_dir` go (tests; an agent keeps its lock until it exits)."""
    with _guard:
        fd = _held.pop(data_dir.resolve(), None)
    if fd is not None:
        os.close(fd)


def _holder(fd: int) -> str:
    """The holder's pid as written in the lock file; empty when the holder has locked
    but not yet written it (two agents starting at once)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int(os.pread(fd, 32, 0).split()[0])
        return f" (pid {pid})"
    return ""
