"""Named cgroup v1 groups under `<controller>/edgecluster/<name>`: create, fill, empty, remove.

Only this module touches /sys/fs/cgroup. Groups are found again by name, so a
crashed run's leftovers can be removed by a later process.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import signal
import time
from pathlib import Path

logger = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("memory", "cpu", "blkio")
GROUP_PARENT = "edgecluster"
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(
            f"device name {name!r} is not usable as a cgroup name: use 1-100 letters, "
            "digits, '_', '.', '-', not starting with '.' or '-'"
        )
    return name


def group_path(controller: str, name: str, root: Path = CGROUP_ROOT) -> Path:
    return root / controller / GROUP_PARENT / check_name(name)


def create_group(controller: str, name: str, root: Path = CGROUP_ROOT) -> Path:
    path = group_path(controller, name, root)
    path.parent.mkdir(exist_ok=True)
    try:
        path.mkdir()
    except FileExistsError:
        raise FileExistsError(
            f"cgroup {path} already exists (left over from a crashed run?); remove it "
            f"with edgecluster.device.emulated.cleanup_stale({name!r}) or pick another name"
        ) from None
    return path


def write_value(group: Path, file: str, value: str | int) -> None:
    try:
        (group / file).write_text(f"{value}\n")
    except OSError as exc:
        raise OSError(
            exc.errno, f"cannot write {value!r} to {group / file}: {exc.strerror}"
        ) from exc


def read_value(group: Path, file: str) -> str:
    return (group / file).read_text().strip()


def group_pids(group: Path) -> list[int]:
    try:
        return [int(line) for line in read_value(group, "cgroup.procs").split()]
    except FileNotFoundError:
        return []


def list_groups(controller: str, root: Path = CGROUP_ROOT) -> list[str]:
    parent = root / controller / GROUP_PARENT
    if not parent.is_dir():
        return []
    return sorted(entry.name for entry in parent.iterdir() if entry.is_dir())


def kill_group_processes(groups: list[Path], timeout_s: float = 5.0) -> None:
    """SIGKILL every process in `groups` (never this one) until they are empty."""
    deadline = time.monotonic() + timeout_s
    while True:
        pids = {pid for group in groups for pid in group_pids(group)} - {os.getpid()}
        if not pids:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"processes {sorted(pids)} survived SIGKILL in {groups}")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)


def remove_group(group: Path, timeout_s: float = 5.0) -> bool:
    """rmdir `group` once its exiting processes are gone; False when it was absent."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            group.rmdir()
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise OSError(exc.errno, f"cannot remove cgroup {group}: {exc.strerror}") from exc
            time.sleep(0.02)


def remove_parent_if_empty(controller: str, root: Path = CGROUP_ROOT) -> None:
    with contextlib.suppress(OSError):  # absent, or another device still uses it
        (root / controller / GROUP_PARENT).rmdir()


def remove_named(name: str, root: Path = CGROUP_ROOT) -> bool:
    """Kill what runs in group `name` and remove it from every controller."""
    groups = [group_path(controller, name, root) for controller in CONTROLLERS]
    existing = [group for group in groups if group.is_dir()]
    kill_group_processes(existing)
    removed = [remove_group(group) for group in existing]
    for controller in CONTROLLERS:
        remove_parent_if_empty(controller, root)
    if existing:
        logger.debug("removed cgroups %s", [str(group) for group in existing])
    return any(removed)
