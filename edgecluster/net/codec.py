"""Tensors on the wire: dtype + shape + raw bytes.

Two encodings, one set of checks:
- gRPC (shard transfer): `TensorChunk` protobuf messages; payloads over CHUNK_BYTES
  travel as several chunks.
- the data channel (every collective of a decode step): a raw header, dtype code +
  dims + send time, then the tensor's bytes as they lie in memory, with no protobuf
  to build or parse (a third of the per-message cost, measured).

Every incoming header is checked against its declared dtype, shape and the configured
limits before any byte is used; a bad one raises TensorMessageError whose message says
what was wrong.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from edgecluster.errors import TensorMessageError
from edgecluster.net.pb import edgecluster_pb2 as pb

CHUNK_BYTES = 1 << 20

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "int8": torch.int8,  # int8 weight matrices (weights.quant) in shard transfers
    "float64": torch.float64,  # training's loss sums and timings
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# A raw header names its dtype by index here: append new dtypes, never reorder.
DTYPE_CODES: tuple[str, ...] = tuple(DTYPES)
_RAW_HEAD = struct.Struct("<BBq")  # dtype code, ndim, sent_at_ns; then ndim int64 dims
_SENT_AT = struct.Struct("<q")  # at offset 2 of a raw header
_CODE_OF = {DTYPES[name]: code for code, name in enumerate(DTYPE_CODES)}
_RAW_HEADS: dict[int, struct.Struct] = {}  # whole raw headers, by ndim
# numpy shapes a received buffer faster than torch's view (bfloat16 goes as int16)
_NUMPY_DTYPES = {
    torch.float32: np.float32,
    torch.bfloat16: np.int16,
    torch.float16: np.float16,
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.uint8: np.uint8,
    torch.int8: np.int8,
    torch.float64: np.float64,
}
assert set(_NUMPY_DTYPES) == set(DTYPES.values()), "every dtype that travels needs a numpy twin"


@dataclass(frozen=True, kw_only=True)
class TensorLimits:
    max_ndim: int = 8
    max_numel: int = 1 << 31
    max_tensor_bytes: int = 4 << 30
    max_chunk_bytes: int = CHUNK_BYTES

    def __post_init__(self) -> None:
        if min(self.max_ndim, self.max_numel, self.max_tensor_bytes, self.max_chunk_bytes) <= 0:
            raise ValueError("tensor limits must all be positive")


DEFAULT_LIMITS = TensorLimits()


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot travel; use one of {sorted(DTYPES)}") from None


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of `t` (a view when `t` is contiguous)."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    if not t.numel():
        return memoryview(b"")
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: the same bytes as int16
        t = t.view(torch.int16)
    return t.numpy().data.cast("B")


def encode_chunks(
    t: torch.Tensor, name: str = "", chunk_bytes: int = CHUNK_BYTES
) -> Iterator[pb.TensorChunk]:
    """TensorChunk messages carrying `t`; one when it fits in `chunk_bytes`."""
    raw = tensor_bytes(t)
    dtype, shape = dtype_name(t.dtype), list(t.shape)
    if len(raw) <= chunk_bytes:
        yield pb.TensorChunk(name=name, dtype=dtype, shape=shape, offset=0, data=raw.tobytes())
        return
    for offset in range(0, len(raw), chunk_bytes):
        piece = raw[offset : offset + chunk_bytes].tobytes()
        yield pb.TensorChunk(name=name, dtype=dtype, shape=shape, offset=offset, data=piece)


def check_header(chunk: pb.TensorChunk, limits: TensorLimits) -> tuple[torch.dtype, int]:
    """(dtype, total byte count) declared by `chunk`, or TensorMessageError."""
    label = f"tensor {chunk.name!r}" if chunk.name else "tensor"
    dtype = DTYPES.get(chunk.dtype)
    if dtype is None:
        raise TensorMessageError(
            f"{label}: unknown dtype {chunk.dtype!r}; expected one of {sorted(DTYPES)}"
        )
    nbytes = _check_shape(label, dtype, list(chunk.shape), limits)
    size = len(chunk.data)  # each read of a bytes field copies it: read it once
    if size > limits.max_chunk_bytes:
        raise TensorMessageError(
            f"{label}: a chunk of {size} bytes exceeds the chunk limit "
            f"{limits.max_chunk_bytes}; split the payload into chunks"
        )
    if chunk.offset < 0 or chunk.offset + size > nbytes:
        raise TensorMessageError(
            f"{label}: bytes [{chunk.offset}, {chunk.offset + size}) fall outside "
            f"the {nbytes} bytes that {chunk.dtype} {list(chunk.shape)} holds"
        )
    return dtype, nbytes


def _check_shape(label: str, dtype: torch.dtype, shape: list[int], limits: TensorLimits) -> int:
    """The byte count of a declared `dtype` `shape`, or TensorMessageError."""
    if len(shape) > limits.max_ndim:
        raise TensorMessageError(f"{label}: {len(shape)} dims exceeds the limit {limits.max_ndim}")
    if any(d < 0 for d in shape):
        raise TensorMessageError(f"{label}: negative dimension in shape {shape}")
    numel = math.prod(shape)
    if numel > limits.max_numel:
        raise TensorMessageError(
            f"{label}: shape {shape} has {numel} elements, over the limit {limits.max_numel}"
        )
    nbytes = numel * dtype.itemsize
    if nbytes > limits.max_tensor_bytes:
        raise TensorMessageError(
            f"{label}: {nbytes} bytes exceeds the size limit {limits.max_tensor_bytes}"
        )
    return nbytes


def raw_header(t: torch.Tensor, sent_at_ns: int) -> bytes:
    """The data channel's header for `t`; `t`'s bytes (`tensor_bytes`) follow it."""
    code = _CODE_OF.get(t.dtype)
    if code is None:
        dtype_name(t.dtype)  # raises the error that names the dtypes that can travel
    ndim = t.dim()
    packer = _RAW_HEADS.get(ndim) or _RAW_HEADS.setdefault(ndim, _raw_head_struct(ndim))
    return packer.pack(code, ndim, sent_at_ns, *t.shape)


def _raw_head_struct(ndim: int) -> struct.Struct:
    return struct.Struct(f"{_RAW_HEAD.format}{ndim}q")


def parse_raw_header(
    header: bytes | memoryview, limits: TensorLimits = DEFAULT_LIMITS
) -> tuple[torch.dtype, list[int], int]:
    """(dtype, shape, sent_at_ns) of a raw header, checked; or TensorMessageError.

    The payload that follows is exactly numel * itemsize bytes: its length comes from
    the checked shape, never from the peer's say-so."""
    if len(header) < _RAW_HEAD.size:
        raise TensorMessageError(
            f"tensor header of {len(header)} bytes is shorter than the {_RAW_HEAD.size} "
            "every header has"
        )
    code, ndim, sent_at_ns = _RAW_HEAD.unpack_from(header)
    if code >= len(DTYPE_CODES):
        raise TensorMessageError(
            f"tensor: unknown dtype code {code}; expected 0-{len(DTYPE_CODES) - 1} "
            f"({', '.join(DTYPE_CODES)})"
        )
    if ndim > limits.max_ndim:
        raise TensorMessageError(f"tensor: {ndim} dims exceeds the limit {limits.max_ndim}")
    if len(header) != _RAW_HEAD.size + 8 * ndim:
        raise TensorMessageError(
            f"tensor header of {len(header)} bytes does not hold the {ndim} dims it declares"
        )
    shape = list(struct.unpack_from(f"<{ndim}q", header, _RAW_HEAD.size))
    dtype = DTYPES[DTYPE_CODES[code]]
    _check_shape("tensor", dtype, shape, limits)
    return dtype, shape, sent_at_ns


def tensor_from_bytes(
    data: bytes | bytearray | memoryview, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor:
    """A new tensor holding a copy of `data`: the raw bytes of a checked `dtype` `shape`."""
    tensor = torch.from_numpy(np.frombuffer(bytearray(data), _NUMPY_DTYPES[dtype]).reshape(shape))
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor


class RawHeaderReader:
    """`parse_raw_header` for one link, its checks done once per distinct dtype and
    shape: a decode step sends the same few headers over and over, and only their
    send time changes. Same errors, same results (the shape as a tuple)."""

    def __init__(self, limits: TensorLimits = DEFAULT_LIMITS, max_entries: int = 64) -> None:
        self._limits = limits
        self._max_entries = max_entries
        self._known: dict[bytes, tuple[torch.dtype, tuple[int, ...], int]] = {}

    def parse(self, header: memoryview) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        """(dtype, shape, payload bytes, sent_at_ns) of a raw header, or TensorMessageError."""
        if len(header) < _RAW_HEAD.size:
            parse_raw_header(header, self._limits)  # raises what is wrong
        key = bytes(header[:2]) + bytes(header[_RAW_HEAD.size :])  # all but the send time
        known = self._known.get(key)
        if known is None:
            dtype, shape, _ = parse_raw_header(header, self._limits)
            known = (dtype, tuple(shape), math.prod(shape) * dtype.itemsize)
            if len(self._known) >= self._max_entries:
                self._known.clear()
            self._known[key] = known
        dtype, shape_t, nbytes = known
        return dtype, shape_t, nbytes, _SENT_AT.unpack_from(header, 2)[0]


def decode_single(chunk: pb.TensorChunk, limits: TensorLimits = DEFAULT_LIMITS) -> torch.Tensor:
    """A tensor carried whole by one chunk."""
    dtype, nbytes = check_header(chunk, limits)
    data = chunk.data
    if chunk.offset != 0 or len(data) != nbytes:
        raise TensorMessageError(
            f"tensor {chunk.name!r}: {chunk.dtype} {list(chunk.shape)} needs {nbytes} bytes "
            f"but the message carries {len(data)} at offset {chunk.offset}"
        )
    return _from_bytes(data, dtype, list(chunk.shape))


def _from_bytes(data: bytes | bytearray, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)


class TensorAssembler:
    """Reassembles one tensor from its chunks, in order, checking each."""

    def __init__(self, limits: TensorLimits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._buffer: bytearray | None = None
        self._header: tuple[str, str, tuple[int, ...]] | None = None
        self._received = 0
        self._dtype = torch.uint8

    def add(self, chunk: pb.TensorChunk) -> torch.Tensor | None:
        """Takes the next chunk; returns the tensor once its last byte arrived."""
        dtype, nbytes = check_header(chunk, self._limits)
        data = chunk.data  # a copy per read: read once
        header = (chunk.name, chunk.dtype, tuple(chunk.shape))
        if self._header is None:
            if chunk.offset != 0:
                raise TensorMessageError(f"tensor {chunk.name!r}: first chunk at {chunk.offset}")
            if len(data) == nbytes:
                return _from_bytes(data, dtype, list(chunk.shape))
            self._header, self._dtype = header, dtype
            self._buffer = bytearray(nbytes)
        elif header != self._header:
            raise TensorMessageError(
                f"chunk of {chunk.name!r} {chunk.dtype} {list(chunk.shape)} does not continue "
                f"tensor {self._header[0]!r} {self._header[1]} {list(self._header[2])}"
            )
        if chunk.offset != self._received:
            raise TensorMessageError(
                f"tensor {chunk.name!r}: chunk at byte {chunk.offset}, expected {self._received}"
            )
        assert self._buffer is not None
        end = chunk.offset + len(data)
        self._buffer[chunk.offset : end] = data
        self._received = end
        if end < len(self._buffer):
            return None
        tensor = torch.frombuffer(self._buffer, dtype=self._dtype).reshape(self._header[2])
        self._buffer, self._header, self._received = None, None, 0
        return tensor

    @property
    def in_progress(self) -> bool:
        return self._header is not None

    def describe_pending(self) -> str:
        """The unfinished tensor and how many of its bytes arrived, for error messages."""
        if self._header is None or self._buffer is None:
            return "no tensor in progress"
        name, dtype, shape = self._header
        return (
            f"tensor {name!r} {dtype} {list(shape)} has {self._received} of its "
            f"{len(self._buffer)} bytes"
        )
