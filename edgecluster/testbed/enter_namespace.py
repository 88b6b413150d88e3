"""Put a service process into its network namespace, give it private mounts, exec its command.

    python -m edgecluster.testbed.enter_namespace --netns NS \
        --bind /etc/netns/NS/hosts:/etc/hosts --bind VOLUME:/data -- cmd args

Why not `ip netns exec`: it remounts /sys for the namespace, which hides
/sys/fs/cgroup, so a service could not read its own cgroup limits (an agent
profiles its memory and CPU quota from there). Here /sys stays as it is; the
mount namespace is private (/ made a slave), so the binds, `/etc/hosts` from
/etc/netns/<ns>/hosts (the `ip netns exec` convention) and the volumes, are seen
by this service alone. The process is already in its cgroups when this runs.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
from collections.abc import Sequence
from pathlib import Path

NETNS_DIR = Path("/run/netns")
CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SLAVE = 0x80000

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def enter_netns(netns: str) -> None:
    """Move the calling thread into network namespace `netns` (from `ip netns add`)."""
    fd = os.open(NETNS_DIR / netns, os.O_RDONLY)
    try:
        _check(_libc.setns(fd, CLONE_NEWNET), f"setns into {netns}")
    finally:
        os.close(fd)


def private_mounts() -> None:
    """A mount namespace of our own whose mounts never propagate back to the host."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare the mount namespace")
    _check(_libc.mount(None, b"/", None, MS_REC | MS_SLAVE, None), "make / a slave mount")


def bind(source: str, target: str) -> None:
    _check(_libc.mount(source.encode(), target.encode(), None, MS_BIND, None), f"bind {source}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="enter a testbed service's namespaces")
    parser.add_argument("--netns", required=True)
    parser.add_argument("--bind", action="append", default=[], metavar="SRC:DST")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    try:
        enter_netns(args.netns)
        private_mounts()
        for spec in args.bind:
            source, _, target = spec.partition(":")
            bind(source, target)
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"enter_namespace: {exc}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main())
