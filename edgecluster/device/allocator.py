"""glibc malloc tuning for the two regimes a node runs in. A no-op off glibc.

- Under a hard memory limit (the agent's `--memory-limit` promise), freed memory
  must go back to the kernel: glibc otherwise raises its mmap threshold after large
  frees, so 1 MiB message buffers land in heap arenas and fragment them. The agent
  fixes a low threshold, caps arenas, and trims after bulk work (`tame_allocator`).
- Without a limit, speed wins: handing every message-sized buffer back to the
  kernel and faulting it in again made a 1 MiB star allreduce 4x slower, so
  buffers stay in the heap (`fast_allocator`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def tame_allocator(mmap_threshold_bytes: int = 128 << 10, max_arenas: int = 2) -> bool:
    """Large allocations straight from mmap (returned on free), few arenas."""
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold_bytes) == 1
    ok &= libc.mallopt(_M_ARENA_MAX, max_arenas) == 1
    log.debug("malloc tuned: mmap threshold %d, arenas %d", mmap_threshold_bytes, max_arenas)
    return bool(ok)


def fast_allocator(mmap_threshold_bytes: int = 64 << 20, trim_bytes: int = 256 << 20) -> bool:
    """Message-sized buffers reused from the heap instead of mmapped and faulted each time."""
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold_bytes) == 1
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, trim_bytes) == 1
    return bool(ok)


def release_free_memory() -> None:
    """Give free heap pages back to the kernel (malloc_trim)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
