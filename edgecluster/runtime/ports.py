"""Is a port free? Checked before a process prints anything, so a taken port is one line.

The probe binds the way the real servers do (SO_REUSEADDR, as asyncio, gRPC and the
data listener set it: a port left in TIME_WAIT is free, one with a listener is not)
and releases the socket at once. The real servers bind moments later; a race with
another process in between still fails, only less politely.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence


def port_taken(host: str, port: int) -> bool:
    """True when something already listens on (host, port); port 0 is never taken."""
    if port == 0:
        return False
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host or "0.0.0.0", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def first_taken(ports: Sequence[tuple[str, int, str, str]]) -> str | None:
    """For (host, port, flag, how to change it): a one-line message about the first
    taken port, or None when all are free."""
    for host, port, flag, how in ports:
        try:
            if port_taken(host, port):
                return f"port {port} ({flag}) is taken; pick another with {how}"
        except OSError as exc:  # a privileged port, an address that is not ours
            return (
                f"cannot listen on {host}:{port} ({flag}): {exc.strerror}; pick another with {how}"
            )
    return None
