"""The data channel's read path: whole frames read in place, header checks done once.

A link reads a small frame whole into its read buffer and checks its tag there; a
frame that straddles the buffer's end is moved to its front, a large tensor is read
straight into its memory. The cached header checks give what `parse_raw_header`
gives, errors included.
"""

from __future__ import annotations

import secrets
import socket
import struct
import threading

import pytest
import torch

from edgecluster.errors import TensorMessageError
from edgecluster.net.codec import RawHeaderReader, TensorLimits, parse_raw_header, raw_header
from edgecluster.net.datachannel import Link
from edgecluster.net.frame_seal import AEAD, MAC, TO_CLIENT, TO_SERVER, FrameSeal
from edgecluster.net.polling_reader import SocketReader


def test_peek_keeps_frames_whole_across_the_buffer_end() -> None:
    a, b = socket.socketpair()
    reader = SocketReader(b, 0, buffer_bytes=64)
    frames = [bytes([i % 251]) * (1 + (i * 7) % 40) for i in range(300)]
    writer = threading.Thread(
        target=a.sendall, args=(b"".join(bytes([len(f)]) + f for f in frames),)
    )
    writer.start()
    for expected in frames:
        size = reader.peek(1)[0]
        view = reader.peek(1 + size)
        assert bytes(view[1 : 1 + size]) == expected
        reader.skip(1 + size)
    writer.join(5)
    with pytest.raises(ValueError, match="exceeds the 64-byte buffer"):
        reader.peek(65)
    a.close()
    assert len(reader.peek(1)) == 0  # the peer closed: a short peek
    b.close()


@pytest.mark.parametrize("mode", [None, MAC, AEAD], ids=["plain", "mac", "aead"])
def test_a_burst_of_mixed_tensors_arrives_whole(mode: int | None) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    sender, receiver = Link(a, "receiver", spin_us=0), Link(b, "sender", spin_us=0)
    if mode is not None:
        key = secrets.token_bytes(32)
        sender.protect(FrameSeal(key, mode=mode, outgoing=TO_SERVER, incoming=TO_CLIENT))
        receiver.protect(FrameSeal(key, mode=mode, outgoing=TO_CLIENT, incoming=TO_SERVER))
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(1, 1 + 97 * i, generator=gen) for i in range(40)]  # ~300 KiB
    tensors[20:20] = [torch.randn(300, 300, generator=gen), torch.tensor(2.5), torch.empty(0, 3)]
    tensors.append(torch.randn(4, 9, generator=gen).bfloat16())
    writer = threading.Thread(target=lambda: [sender.send_tensor(t) for t in tensors])
    writer.start()
    try:
        for expected in tensors:
            got = receiver.recv_tensor()
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert torch.equal(got, expected)
    finally:
        writer.join(10)
        sender.close()
        receiver.close()


def test_cached_header_checks_match_the_full_checks() -> None:
    limits = TensorLimits(max_ndim=3, max_numel=1000)
    reader = RawHeaderReader(limits, max_entries=2)
    for t in [torch.ones(2, 3), torch.ones(5, dtype=torch.int64), torch.tensor(1.0)] * 2:
        header = memoryview(raw_header(t, 123))
        dtype, shape, nbytes, sent_at = reader.parse(header)
        assert (dtype, list(shape), sent_at) == parse_raw_header(header, limits)
        assert nbytes == t.numel() * t.element_size()
    good = raw_header(torch.ones(2, 3), 7)
    bad = [
        (bytes([99]) + good[1:], "unknown dtype code 99"),  # cached dims, another code
        (good[:9], "shorter than the 10"),
        (good[:-1], "does not hold the 2 dims"),
        (good[:10] + struct.pack("<2q", 2, -3), "negative dimension"),
        (good[:10] + struct.pack("<2q", 100, 100), "over the limit 1000"),
        (raw_header(torch.ones(1, 1, 1, 1), 0), "4 dims exceeds the limit 3"),
    ]
    for header, match in bad:
        with pytest.raises(TensorMessageError, match=match):
            parse_raw_header(header, limits)
        with pytest.raises(TensorMessageError, match=match):
            reader.parse(memoryview(header))
