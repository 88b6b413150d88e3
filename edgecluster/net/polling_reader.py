"""The data channel's receive side: buffered exact reads that poll before they block.

A decode step waits dozens of times for a frame that is a few hundred microseconds
away. Blocking at once lets the core go idle, and waking an idle core costs tens of
microseconds (about 43 us against 6 us measured here, in a VM). So a read first polls
for up to `spin_ns`, giving the core away at each turn (sched_yield) so a process that
shares it loses little, then blocks. `EDGE_SPIN_US` sets the polling time; under a
cgroup CPU quota the default is 0, since polling would spend the quota compute needs.

A reader may have a deadline (`deadline_ms`): a read that sees no byte for that long
raises ReadDeadlineError instead of blocking on (see EDGE_READ_DEADLINE_S).

A small frame is read without copying it out: `peek` makes it wait whole in the
buffer and returns a view of it, `skip` consumes it once the caller has used it.
"""

from __future__ import annotations

import os
import select
import socket
import time

from edgecluster.device.profile import cgroup_cpu_quota

DEFAULT_SPIN_US = 500.0  # how long a read polls before it blocks (EDGE_SPIN_US)


class ReadDeadlineError(TimeoutError):
    """No byte arrived within the reader's deadline."""


def env_amount(name: str, unit: str) -> float | None:
    """A non-negative number from the environment, None when unset or empty."""
    raw = os.environ.get(name, "")
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number of {unit}") from None
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def default_spin_us() -> float:
    """EDGE_SPIN_US, else DEFAULT_SPIN_US, else 0 under a cgroup CPU quota."""
    value = env_amount("EDGE_SPIN_US", "microseconds")
    if value is None:
        return 0.0 if cgroup_cpu_quota() else DEFAULT_SPIN_US
    return value


class SocketReader:
    """Exact reads from `sock` through one buffer; a read that must wait polls first."""

    def __init__(self, sock: socket.socket, spin_ns: int, buffer_bytes: int = 1 << 18) -> None:
        self._sock = sock
        self._view = memoryview(bytearray(buffer_bytes))
        self._start = self._end = 0
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)
        self.spin_ns = spin_ns
        self.deadline_ms: int | None = None  # None: a read may wait forever

    @property
    def buffered(self) -> bool:
        """Whether received bytes wait in the buffer (a read would start at once)."""
        return self._end > self._start

    def read(self, size: int) -> bytes:
        """Exactly `size` bytes, or fewer when the peer closed the stream."""
        if self._end - self._start >= size:  # the usual case: one copy out of the buffer
            self._start += size
            return bytes(self._view[self._start - size : self._start])
        out = bytearray(size)
        filled = self.read_into(memoryview(out))
        return bytes(memoryview(out)[:filled])

    def read_into(self, into: memoryview) -> int:
        """Fills `into`: buffered bytes first, then from the socket (a remainder as large
        as the buffer straight into `into`). Returns the count, short only when the
        peer closed the stream."""
        size, filled = len(into), 0
        while True:
            take = min(size - filled, self._end - self._start)
            into[filled : filled + take] = self._view[self._start : self._start + take]
            self._start += take
            filled += take
            if filled == size:
                return filled
            self._wait()  # the buffer is empty: wait for the socket
            if size - filled >= len(self._view):
                got = self._sock.recv_into(into[filled:])
                filled += got
            else:
                got = self._sock.recv_into(self._view)
                self._start, self._end = 0, got
            if got == 0:
                return filled

    def peek(self, size: int) -> memoryview:
        """At least `size` received bytes from the read position, not consumed (fewer
        only when the peer closed the stream): a view of the buffer, valid until the
        next read or skip. `size` must fit the buffer (`capacity`)."""
        if self._end - self._start < size:
            self._fill(size)
        return self._view[self._start : self._end]

    def skip(self, size: int) -> None:
        """Consumes `size` bytes that `peek` returned."""
        assert size <= self._end - self._start, "skip past the bytes received"
        self._start += size

    @property
    def capacity(self) -> int:
        """The most bytes one `peek` can hold."""
        return len(self._view)

    def _fill(self, size: int) -> None:
        if size > len(self._view):
            raise ValueError(f"a peek of {size} bytes exceeds the {len(self._view)}-byte buffer")
        held = self._end - self._start
        if self._start + size > len(self._view):  # no room behind: move what is held forward
            self._view[:held] = bytes(self._view[self._start : self._end])
            self._start, self._end = 0, held
        while self._end - self._start < size:
            self._wait()
            got = self._sock.recv_into(self._view[self._end :])
            if got == 0:
                return
            self._end += got

    def _wait(self) -> None:
        """Waits until the socket is readable: polls first, then blocks, up to the deadline."""
        self.spin(self.spin_ns)
        if self.deadline_ms is not None and not self._poller.poll(self.deadline_ms):
            raise ReadDeadlineError(f"no byte for {self.deadline_ms} ms")

    def spin(self, budget_ns: int) -> None:
        """Polls for up to `budget_ns` until the socket is readable, yielding the core
        between polls."""
        if budget_ns <= 0:
            return
        deadline = time.monotonic_ns() + budget_ns
        while not self._poller.poll(0) and time.monotonic_ns() <= deadline:
            os.sched_yield()
