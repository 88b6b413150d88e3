"""The tensor codec: every dtype round-trips, chunking reassembles, every bad message is named."""

from __future__ import annotations

import pytest
import torch

from edgecluster.errors import TensorMessageError
from edgecluster.net.codec import (
    CHUNK_BYTES,
    DTYPES,
    TensorAssembler,
    TensorLimits,
    decode_single,
    encode_chunks,
)
from edgecluster.net.pb import edgecluster_pb2 as pb


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    low, high = {torch.uint8: (0, 256), torch.int8: (-128, 128)}.get(dtype, (0, 1 << 30))
    return torch.randint(low, high, shape, generator=gen, dtype=dtype)


def _reassemble(chunks: list[pb.TensorChunk], limits: TensorLimits | None = None) -> torch.Tensor:
    assembler = TensorAssembler(limits or TensorLimits())
    results = [assembler.add(c) for c in chunks]
    assert all(r is None for r in results[:-1]), "a tensor came out before its last chunk"
    assert results[-1] is not None and not assembler.in_progress
    return results[-1]


def _chunk(dtype: str = "float32", shape: list[int] | None = None, data: bytes = b"", **kw):
    return pb.TensorChunk(
        name="w", dtype=dtype, shape=[3] if shape is None else shape, data=data, **kw
    )


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (2, 0, 3), (1,), (3, 5), (2, 3, 4, 5)])
def test_round_trip_every_dtype_and_shape(dtype_name: str, shape: tuple[int, ...]) -> None:
    t = _sample(DTYPES[dtype_name], shape)
    chunks = list(encode_chunks(t, name="x"))
    assert len(chunks) == 1
    assert (chunks[0].dtype, list(chunks[0].shape), chunks[0].name) == (
        dtype_name,
        list(shape),
        "x",
    )
    assert len(chunks[0].data) == t.numel() * t.element_size()
    for out in (decode_single(chunks[0]), _reassemble(chunks)):
        assert out.dtype == t.dtype and out.shape == t.shape
        assert torch.equal(out, t)


def test_bfloat16_bytes_are_exact() -> None:
    # bfloat16 has no numpy dtype: check the raw bits survive, including NaN and -0.0.
    t = torch.tensor([1.0, -0.0, float("inf"), float("nan"), 3.140625], dtype=torch.bfloat16)
    out = decode_single(next(encode_chunks(t)))
    assert torch.equal(out.view(torch.int16), t.view(torch.int16))


def test_non_contiguous_tensors_travel_as_their_values() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # [4, 3], transposed strides
    assert not t.is_contiguous()
    assert torch.equal(decode_single(next(encode_chunks(t))), t)


def test_payloads_over_one_mib_are_chunked_and_reassembled() -> None:
    t = _sample(torch.float32, (3 * CHUNK_BYTES // 4 + 5,))  # 3 MiB + 20 bytes
    chunks = list(encode_chunks(t, name="big"))
    assert len(chunks) == 4
    assert all(len(c.data) == CHUNK_BYTES for c in chunks[:-1]) and len(chunks[-1].data) == 20
    assert [c.offset for c in chunks] == [i * CHUNK_BYTES for i in range(4)]
    assert all(c.name == "big" and list(c.shape) == list(t.shape) for c in chunks)
    assert torch.equal(_reassemble(chunks), t)


def test_exactly_one_mib_is_one_chunk_and_a_small_chunk_size_is_honoured() -> None:
    t = torch.zeros(CHUNK_BYTES // 2, dtype=torch.bfloat16)
    assert len(list(encode_chunks(t))) == 1
    small = torch.arange(10, dtype=torch.int64)  # 80 bytes in chunks of 24: not dtype-aligned
    chunks = list(encode_chunks(small, chunk_bytes=24))
    assert [len(c.data) for c in chunks] == [24, 24, 24, 8]
    assert torch.equal(_reassemble(chunks), small)


def test_an_assembler_takes_several_tensors_in_turn() -> None:
    assembler = TensorAssembler()
    a, b = torch.ones(3), torch.arange(40, dtype=torch.int32)
    chunks = [*encode_chunks(a), *encode_chunks(b, chunk_bytes=64)]
    outs = [t for c in chunks if (t := assembler.add(c)) is not None]
    assert len(outs) == 2 and torch.equal(outs[0], a) and torch.equal(outs[1], b)


# (chunk, what the error must say, whether the header alone is wrong: then an assembler
# refuses it too; a short first chunk is merely the start of a chunked tensor to it).
INVALID = [
    (_chunk(data=bytes(11)), r"needs 12 bytes but the message carries 11", False),
    (_chunk(data=bytes(13)), r"bytes \[0, 13\) fall outside the 12 bytes", True),
    (_chunk(shape=[2, 2], data=bytes(12)), r"needs 16 bytes but the message carries 12", False),
    (_chunk(dtype="complex64", data=bytes(24)), r"unknown dtype 'complex64'", True),
    (_chunk(dtype="", data=bytes(12)), r"unknown dtype ''", True),
    (_chunk(shape=[1] * 9, data=bytes(4)), r"9 dims exceeds the limit 8", True),
    (_chunk(shape=[3, -1]), r"negative dimension", True),
    (_chunk(shape=[1 << 40]), r"has 1099511627776 elements, over the limit", True),
    (_chunk(shape=[1 << 30, 4]), r"over the limit 2147483648", True),
    (_chunk(dtype="int64", shape=[1 << 30]), r"8589934592 bytes exceeds the size limit", True),
    (_chunk(shape=[1 << 20], data=bytes(CHUNK_BYTES + 4)), r"exceeds the chunk limit", True),
    (_chunk(data=bytes(4), offset=4), r"carries 4 at offset 4", False),
    (_chunk(data=bytes(4), offset=-4), r"fall outside", True),
]


@pytest.mark.parametrize(("chunk", "match", "bad_header"), INVALID)
def test_invalid_messages_are_named(chunk: pb.TensorChunk, match: str, bad_header: bool) -> None:
    with pytest.raises(TensorMessageError, match=match):
        decode_single(chunk)
    if bad_header:
        with pytest.raises(TensorMessageError, match=match):
            TensorAssembler().add(chunk)


def test_tensor_message_error_is_a_value_error_naming_the_tensor() -> None:
    with pytest.raises(ValueError, match="tensor 'w': unknown dtype"):
        decode_single(_chunk(dtype="float8"))


def test_limits_are_configurable_and_validated() -> None:
    tight = TensorLimits(max_ndim=2, max_numel=10, max_tensor_bytes=16, max_chunk_bytes=8)
    with pytest.raises(TensorMessageError, match="3 dims exceeds the limit 2"):
        decode_single(_chunk(shape=[1, 1, 1], data=bytes(4)), tight)
    with pytest.raises(TensorMessageError, match="11 elements, over the limit 10"):
        decode_single(_chunk(dtype="uint8", shape=[11], data=bytes(11)), tight)
    with pytest.raises(TensorMessageError, match="20 bytes exceeds the size limit 16"):
        decode_single(_chunk(shape=[5], data=bytes(20)), tight)
    with pytest.raises(TensorMessageError, match="a chunk of 12 bytes exceeds the chunk limit 8"):
        decode_single(_chunk(data=bytes(12)), tight)
    with pytest.raises(ValueError, match="positive"):
        TensorLimits(max_ndim=0)


def test_out_of_order_chunks_are_refused() -> None:
    chunks = list(encode_chunks(torch.arange(64, dtype=torch.float32), chunk_bytes=64))
    assembler = TensorAssembler()
    assert assembler.add(chunks[0]) is None
    with pytest.raises(TensorMessageError, match="chunk at byte 128, expected 64"):
        assembler.add(chunks[2])
    with pytest.raises(TensorMessageError, match="first chunk at 64"):
        TensorAssembler().add(chunks[1])
    repeated = TensorAssembler()
    repeated.add(chunks[0])
    with pytest.raises(TensorMessageError, match="chunk at byte 0, expected 64"):
        repeated.add(chunks[0])


def test_a_chunk_of_another_tensor_is_refused_mid_tensor() -> None:
    first = list(encode_chunks(torch.zeros(32), name="a", chunk_bytes=64))
    other = list(encode_chunks(torch.zeros(32), name="b", chunk_bytes=64))
    reshaped = list(encode_chunks(torch.zeros(4, 8), name="a", chunk_bytes=64))
    for intruder in (other[1], reshaped[1]):
        assembler = TensorAssembler()
        assembler.add(first[0])
        with pytest.raises(TensorMessageError, match="does not continue tensor 'a'"):
            assembler.add(intruder)


def test_a_chunk_past_the_end_is_refused() -> None:
    chunks = list(encode_chunks(torch.zeros(20), chunk_bytes=64))  # 80 bytes: 64 + 16
    late = pb.TensorChunk()
    late.CopyFrom(chunks[1])
    late.data = bytes(32)
    assembler = TensorAssembler()
    assembler.add(chunks[0])
    with pytest.raises(TensorMessageError, match=r"bytes \[64, 96\) fall outside the 80 bytes"):
        assembler.add(late)


def test_types_that_cannot_travel_are_refused_when_sending() -> None:
    with pytest.raises(ValueError, match="cannot travel"):
        next(encode_chunks(torch.zeros(2, dtype=torch.complex64)))


def test_an_unfinished_tensor_says_how_much_of_it_arrived() -> None:
    assembler = TensorAssembler()
    assert assembler.describe_pending() == "no tensor in progress"
    chunks = list(encode_chunks(torch.zeros(2, 8), name="q", chunk_bytes=40))
    assembler.add(chunks[0])
    assert assembler.in_progress
    assert assembler.describe_pending() == "tensor 'q' float32 [2, 8] has 40 of its 64 bytes"
    assert assembler.add(chunks[1]) is not None and not assembler.in_progress
