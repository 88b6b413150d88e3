"""Keep a memory-capped process's resident set honest: glibc malloc tuning.

glibc raises its mmap threshold dynamically after large frees, after which 1 MiB
message buffers land in heap arenas and fragment them; per-thread arenas multiply
that. Under a hard memory limit (the agent's `--memory-limit` promise) freed
memory must go back to the kernel, so the agent fixes the threshold, caps arenas,
and trims after bulk work such as receiving its shard. A no-op off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

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


def release_free_memory() -> None:
    """Give free heap pages back to the kernel (malloc_trim)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
