"""Disk-backed weights through a sliding window (TPI-LLM's memory scheduler, done with O_DIRECT).

An agent whose shard does not fit its memory keeps only `window` blocks (half-layers)
resident. Compute visits blocks in a fixed cyclic order (layer 0 attention, layer 0
MLP, layer 1 attention, ...), so a background reader can fill the window ahead of
compute: while block i computes (and waits on its allreduce), blocks i+1 .. i+W-1
are being read. A block's slot is released as soon as its compute is done and the
reader reuses it for the block W ahead.

Each block is one file read with one large sequential read into a preallocated,
page-aligned slot (O_DIRECT where the filesystem allows, so reads neither pollute
nor are served from the page cache and the memory a block needs is the slot alone),
and its tensors are views of the slot: no re-parsing per token beyond the header,
no allocation per read. `prepare` turns a block's tensors into what compute uses at
acquire (`engine.linear.prepare_block`: bytes stored in bf16 or int8 are converted
then, into buffers freed at release); by default tensors stored in another floating
dtype are converted to the compute dtype.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgecluster.weights.safetensors_file import tensors_from_buffer

log = logging.getLogger(__name__)

_ALIGN = 4096
BlockKey = tuple[int, str]  # (layer, "attn" | "mlp")


@dataclass
class _Slot:
    raw: mmap.mmap
    buffer: torch.Tensor  # uint8 view of raw
    key: BlockKey | None = None
    tensors: dict[str, torch.Tensor] | None = None


@dataclass(frozen=True, kw_only=True)
class StreamStats:
    bytes_read: int
    read_seconds: float
    wait_seconds: float  # compute waiting for a block: the stall TPI-LLM's condition avoids

    @property
    def read_bytes_per_s(self) -> float:
        return self.bytes_read / self.read_seconds if self.read_seconds else 0.0


def _round_up(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class StreamingWeights:
    """A WeightSource streaming `order`'s block files through `window` slots."""

    def __init__(
        self,
        order: list[tuple[BlockKey, Path]],
        window: int,
        dtype: torch.dtype,
        prepare: Callable[[dict[str, torch.Tensor], str], dict[str, Any]] | None = None,
    ) -> None:
        if window < 2:
            raise ValueError(f"streaming window must be at least 2 blocks, got {window}")
        if not order:
            raise ValueError("nothing to stream: the shard has no blocks")
        self._order = order
        self._dtype = dtype
        self._prepare = prepare or self._to_dtype
        self._sizes = [p.stat().st_size for _, p in order]
        slot_bytes = _round_up(max(self._sizes))
        self.window = min(window, len(order))
        self._slots = [self._new_slot(slot_bytes) for _ in range(self.window)]
        self._free: deque[_Slot] = deque(self._slots)
        self._ready: dict[BlockKey, _Slot] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._bytes = 0
        self._read_s = self._wait_s = 0.0
        self._converted: dict[BlockKey, dict[str, Any]] = {}
        self._reader = threading.Thread(target=self._read_loop, name="block-reader", daemon=True)
        self._reader.start()

    @staticmethod
    def _new_slot(size: int) -> _Slot:
        raw = mmap.mmap(-1, size)  # anonymous: page-aligned, as O_DIRECT needs
        return _Slot(raw=raw, buffer=torch.frombuffer(raw, dtype=torch.uint8))

    @property
    def resident_bytes(self) -> int:
        return sum(s.buffer.numel() for s in self._slots)

    def stats(self) -> StreamStats:
        with self._cond:
            return StreamStats(
                bytes_read=self._bytes, read_seconds=self._read_s, wait_seconds=self._wait_s
            )

    # ---- compute side ----
    def _to_dtype(self, tensors: dict[str, torch.Tensor], kind: str) -> dict[str, Any]:
        return {
            n: t.to(self._dtype) if t.is_floating_point() and t.dtype != self._dtype else t
            for n, t in tensors.items()
        }

    def acquire(self, layer: int, kind: str) -> dict[str, Any]:
        key = (layer, kind)
        start = time.perf_counter()
        with self._cond:
            while key not in self._ready:
                if self._closed:
                    raise RuntimeError("the weight stream is closed")
                self._cond.wait()
            slot = self._ready[key]
            self._wait_s += time.perf_counter() - start
        assert slot.tensors is not None
        prepared = self._prepare(slot.tensors, kind)  # views of the slot where it can
        self._converted[key] = prepared
        return prepared

    def release(self, layer: int, kind: str) -> None:
        key = (layer, kind)
        self._converted.pop(key, None)
        with self._cond:
            slot = self._ready.pop(key)
            slot.key, slot.tensors = None, None
            self._free.append(slot)
            self._cond.notify_all()

    # ---- reader side ----
    def _read_loop(self) -> None:
        index = 0
        while True:
            with self._cond:
                while not self._free and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                slot = self._free.popleft()
            key, path = self._order[index]
            try:
                self._fill(slot, key, path, self._sizes[index])
            except (OSError, ValueError) as exc:
                log.error("cannot read block %s from %s: %s", key, path, exc)
                with self._cond:
                    self._closed = True
                    self._cond.notify_all()
                return
            index = (index + 1) % len(self._order)

    def _fill(self, slot: _Slot, key: BlockKey, path: Path, size: int) -> None:
        start = time.perf_counter()
        _read_into(path, slot.raw, size)
        tensors = tensors_from_buffer(slot.buffer[:size], path)
        elapsed = time.perf_counter() - start
        with self._cond:
            slot.key, slot.tensors = key, tensors
            self._ready[key] = slot
            self._bytes += size
            self._read_s += elapsed
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._reader.join(timeout=5)


def _read_into(path: Path, raw: mmap.mmap, size: int) -> None:
    """Reads the whole file into `raw` with direct I/O where possible."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        direct = True
    except OSError:
        fd, direct = os.open(path, os.O_RDONLY), False
    try:
        view = memoryview(raw)
        length = _round_up(size) if direct else size
        done = 0
        while done < size:
            n = os.preadv(fd, [view[done:length]], done)
            if n <= 0:
                raise ValueError(f"{path}: file shorter than its {size} bytes")
            done += n
        if not direct:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
