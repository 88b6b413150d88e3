"""The safetensors file format, read by hand where the library's reader does not fit.

A safetensors file is: an 8-byte little-endian header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`),
then the tensor data, contiguous, offsets relative to the end of the header.

Two uses here: `read_header_bytes` gives a file's header without touching its data
(cheap fingerprints of multi-gigabyte checkpoints), and `read_block_raw` reads a whole
shard block with one read into one buffer and returns tensors that are views of it,
which is what the streaming store wants: one large sequential read per block, no
per-tensor reads, no mmap page faults during compute. Every offset is checked against
the file size before a view is made, so a truncated or forged file is refused with a
ValueError instead of read out of bounds.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit

# safetensors dtype codes <-> torch dtypes
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True, kw_only=True)
class TensorEntry:
    """One tensor of a safetensors file; `begin`/`end` are absolute byte offsets in the file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header_bytes(path: Path) -> bytes:
    """The raw JSON header of a safetensors file (reads only the header)."""
    with open(path, "rb") as f:
        header_len = _header_len(f.read(8), os.fstat(f.fileno()).st_size, path)
        header = f.read(header_len)
    if len(header) != header_len:
        raise ValueError(
            f"{path}: truncated safetensors header; delete the file and fetch it again"
        )
    return header


def parse_header(header: bytes, file_size: int, path: Path | str = "<buffer>") -> list[TensorEntry]:
    """Validated entries of a header: known dtypes, sizes that match shapes, in-bounds data."""
    try:
        raw = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: safetensors header is not JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: safetensors header is not a JSON object")
    data_start = 8 + len(header)
    return [
        _parse_entry(name, info, data_start, file_size, path)
        for name, info in raw.items()
        if name != "__metadata__"
    ]


def read_block_raw(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, read with one contiguous read.

    The file is read whole into one preallocated uint8 tensor (a single `readinto`,
    repeated only if the kernel returns a short read, e.g. over 2 GiB on Linux), and
    each tensor is a view into that buffer, built from the header: no copies, no
    second read. The buffer lives as long as any returned tensor does. The torch
    allocator aligns the buffer to 64 bytes and safetensors aligns data to 8 bytes,
    so the views are aligned; a file that is not gets a copy for that tensor.
    """
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        buf = torch.empty(size, dtype=torch.uint8)
        view = buf.numpy().data  # memoryview of the buffer
        done = 0
        while done < size:
            n = f.readinto(view[done:])
            if not n:
                raise ValueError(f"{path}: file shrank while being read")
            done += n
    return tensors_from_buffer(buf, path)


def tensors_from_buffer(
    buf: torch.Tensor, path: Path | str = "<buffer>"
) -> dict[str, torch.Tensor]:
    """Tensors of a whole safetensors file held in a 1-D uint8 tensor, as views of it."""
    if buf.dtype != torch.uint8 or buf.dim() != 1:
        raise ValueError("tensors_from_buffer needs a 1-D uint8 tensor holding the whole file")
    size = buf.numel()
    header_len = _header_len(bytes(buf[:8].numpy()), size, path)
    header = bytes(buf[8 : 8 + header_len].numpy())
    return {e.name: _view(buf, e) for e in parse_header(header, size, path)}


def _header_len(prefix: bytes, file_size: int, path: Path | str) -> int:
    if len(prefix) < 8:
        raise ValueError(f"{path}: too short to be a safetensors file ({file_size} bytes)")
    (header_len,) = struct.unpack("<Q", prefix[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
        raise ValueError(
            f"{path}: safetensors header length {header_len} does not fit a {file_size}-byte "
            "file; the file is truncated or not safetensors"
        )
    return int(header_len)


def _parse_entry(
    name: str, info: object, data_start: int, file_size: int, path: Path | str
) -> TensorEntry:
    if not isinstance(info, dict):
        raise ValueError(f"{path}: header entry {name!r} is not an object")
    dtype = SAFETENSORS_DTYPES.get(str(info.get("dtype")))
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if dtype is None:
        raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
    if not _int_list(shape) or not _int_list(offsets, length=2):
        raise ValueError(f"{path}: tensor {name!r} has a malformed shape or data_offsets")
    assert isinstance(shape, list) and isinstance(offsets, list)
    begin, end = data_start + offsets[0], data_start + offsets[1]
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected or begin > end or end > file_size:
        raise ValueError(
            f"{path}: tensor {name!r} claims bytes [{begin}, {end}) for {expected} bytes in a "
            f"{file_size}-byte file; the file is truncated or corrupted"
        )
    return TensorEntry(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _int_list(value: object, length: int | None = None) -> bool:
    if not isinstance(value, list) or (length is not None and len(value) != length):
        return False
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def _view(buf: torch.Tensor, entry: TensorEntry) -> torch.Tensor:
    raw = buf[entry.begin : entry.end]
    if entry.end == entry.begin:
        return torch.empty(entry.shape, dtype=entry.dtype)
    if entry.begin % entry.dtype.itemsize:
        raw = raw.clone()  # unaligned data: copy rather than make a misaligned view
    return raw.view(entry.dtype).reshape(entry.shape)
