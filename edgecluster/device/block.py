"""Find the whole-disk block device (major, minor) that blkio throttling needs.

The blkio controller throttles whole disks only: a partition such as vda1 must be
named by its disk (vda). Anything here reads /proc and /sys; nothing is written.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

SYS_DEV_BLOCK = Path("/sys/dev/block")
MOUNTINFO = Path("/proc/self/mountinfo")

DeviceNumber = tuple[int, int]


def parse_device(device: str) -> DeviceNumber:
    """(major, minor) of `device`, given as "MAJ:MIN" or as a path like /dev/vda."""
    if ":" in device and not device.startswith("/"):
        major, _, minor = device.partition(":")
        if major.isdigit() and minor.isdigit():
            return int(major), int(minor)
        raise ValueError(f"cannot read block device {device!r}: use MAJ:MIN such as 254:0")
    try:
        mode = os.stat(device)
    except FileNotFoundError:
        raise ValueError(
            f"block device {device!r} does not exist; name one that does "
            "(see `lsblk`) or give MAJ:MIN"
        ) from None
    if not stat.S_ISBLK(mode.st_mode):
        raise ValueError(f"{device!r} is not a block device; name one from `lsblk`")
    return os.major(mode.st_rdev), os.minor(mode.st_rdev)


def whole_disk(number: DeviceNumber, sys_dev_block: Path = SYS_DEV_BLOCK) -> DeviceNumber:
    """The disk holding partition `number`, or `number` itself when it is a disk."""
    entry = sys_dev_block / f"{number[0]}:{number[1]}"
    if not (entry / "partition").exists():
        return number
    parent_dev = (entry.resolve().parent / "dev").read_text().strip()
    return parse_device(parent_dev)


def disk_holding(path: str | os.PathLike[str]) -> DeviceNumber:
    """Whole disk that stores `path`: from its st_dev, else from the mount table."""
    st_dev = os.stat(path).st_dev
    number = (os.major(st_dev), os.minor(st_dev))
    if number[0] == 0:  # anonymous device (overlay, btrfs, tmpfs): ask the mount table
        number = _mount_source_device(Path(path))
    return whole_disk(number)


def _mount_source_device(path: Path) -> DeviceNumber:
    target = path.resolve()
    best: tuple[int, str] | None = None
    for line in MOUNTINFO.read_text().splitlines():
        fields = line.split()
        mount_point = fields[4]
        source = fields[fields.index("-") + 2]
        inside = target == Path(mount_point) or Path(mount_point) in target.parents
        if inside and (best is None or len(mount_point) > best[0]):
            best = (len(mount_point), source)
    if best is None or not best[1].startswith("/dev/"):
        raise ValueError(
            f"cannot find the block device holding {str(path)!r} (it is on "
            f"{best[1] if best else 'an unknown mount'}); name one with device='/dev/sda'"
        )
    return parse_device(best[1])
