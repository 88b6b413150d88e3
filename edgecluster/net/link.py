"""Data-channel links: kept TCP streams carrying length-prefixed, tagged frames.

Frames: a 4-byte little-endian length, then that many bytes whose first is the type:
- CONTROL (0): a serialized protobuf `Frame` (handshake, ERROR, BYE, KEEPALIVE);
- TENSOR (1): a raw tensor header (dtype code, dims, send time; see codec), followed
  by the tensor's numel * itemsize bytes, which the length does not count. A frame of
  up to 128 KiB is read whole into the link's read buffer, its tag checked where it
  lies and its payload copied once into the new tensor; a larger tensor's bytes are
  read straight into its memory once the header has been checked.
Once the handshake (datachannel.py) proved the session key, a 16-byte tag follows
each frame, after its payload (frame_seal.py): MAC, or AEAD with the payload sealed.
Raw tensor frames cost a third of a protobuf message per tensor (no message to build,
serialize, parse or copy out of), and a decode step sends hundreds of them.

A frame over the limit or a bad tensor header ends that link with an ERROR frame; a
frame failing its tag (tampered, injected, replayed, reordered) ends it with an error
naming the peer. A rank that loses a peer tells the rest with an ERROR frame naming
the lost rank (`Link.report_lost`), so nobody waits forever.

Liveness: a link may have a read deadline (`Link.deadline_s`, set by the
communicator while a step runs): a read that sees no byte, frame or KEEPALIVE, for
that long raises PeerLostError naming the silent peer. KEEPALIVE frames are skipped
by every receive.

Link emulation (`Link.emulate`; `link_delay_ms` defaults from EDGE_LINK_DELAY_MS)
makes a fast link behave like a slow one: each frame received is held until it would
have arrived over a link of that delay and bandwidth (link_emulation.py). Same-machine
only: sent-at stamps are CLOCK_MONOTONIC. Without emulation a frame costs one test.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn, TypeVar

import torch

from edgecluster.errors import PeerLostError, TensorMessageError
from edgecluster.net.codec import (
    DEFAULT_LIMITS,
    RawHeaderReader,
    TensorLimits,
    raw_header,
    tensor_bytes,
    tensor_from_bytes,
)
from edgecluster.net.frame_seal import (
    TAG_BYTES,
    FrameForgedError,
    FrameSeal,
)
from edgecluster.net.link_emulation import ArrivalClock, LinkEmulation
from edgecluster.net.pb import edgecluster_pb2 as pb
from edgecluster.net.polling_reader import (
    ReadDeadlineError,
    SocketReader,
    default_spin_us,
    env_amount,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

_LEN = struct.Struct("<I")
_CONTROL, _TENSOR = b"\x00", b"\x01"  # frame types (the first byte after the length)
_CONTROL_TYPE, _TENSOR_TYPE = _CONTROL[0], _TENSOR[0]
MAX_FRAME_BYTES = 64 << 10  # a control frame or a tensor header (a tensor's bytes follow)
_COALESCE_BYTES = 64 << 10  # tensors up to this size go out as one write with their header
_WHOLE_FRAME_BYTES = 128 << 10  # frames up to this size are read whole into the read buffer
REPORT_TIMEOUT_S = 1.0
_LOST_PREFIX = "PEER_LOST "  # ERROR frame: "PEER_LOST <name>\n<detail>", a lost rank


def default_link_delay_ms() -> float:
    value = env_amount("EDGE_LINK_DELAY_MS", "milliseconds")
    return 0.0 if value is None else value


class Link:
    """One authenticated TCP stream to a peer rank. Not thread-safe per direction."""

    def __init__(
        self,
        sock: socket.socket,
        peer: str,
        *,
        link_delay_ms: float = 0.0,
        bandwidth_bytes_per_s: float = 0.0,
        limits: TensorLimits = DEFAULT_LIMITS,
        spin_us: float | None = None,
    ) -> None:
        spin_us = default_spin_us() if spin_us is None else spin_us
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.peer = peer
        self._reader = SocketReader(sock, int(spin_us * 1000))
        self.emulate(
            LinkEmulation(delay_ms=link_delay_ms, bandwidth_bytes_per_s=bandwidth_bytes_per_s)
        )
        self._headers = RawHeaderReader(limits)
        self._send_lock = threading.Lock()
        self._seal: FrameSeal | None = None  # set once the handshake proved the key
        self.deadline_s: float | None = None  # a read waits at most this long for a byte
        self.last_sent = self.last_received = time.monotonic()

    def emulate(self, emulation: LinkEmulation) -> None:
        """Frames received from now on are held as `emulation` says (see the module doc).
        Call before the link is read from, or between reads of the same thread."""
        self.emulation = emulation
        self._arrival = ArrivalClock(emulation) if emulation.active else None

    def protect(self, seal: FrameSeal) -> None:
        """From now on every frame either way carries a tag (and is sealed, in AEAD)."""
        self._seal = seal

    # -- frames --
    def send_frame(self, frame: pb.Frame) -> None:
        with self._sending():
            self.sock.sendall(self._control_packet(frame))

    def send_keepalive(self) -> bool:
        """A KEEPALIVE frame, unless a send is under way (which says as much)."""
        if not self._send_lock.acquire(blocking=False):
            return False
        try:
            self.sock.sendall(self._control_packet(pb.Frame(kind=pb.Frame.KEEPALIVE)))
            self.last_sent = time.monotonic()
            return True
        except OSError:
            return False  # the next read or send reports the loss
        finally:
            self._send_lock.release()

    def send_tensor_parts(self, head: bytes, payload: memoryview) -> None:
        """A tensor frame from its length-prefixed header and its bytes (`tensor_packet`).
        A small tensor goes out with its header in one write; a large one is not copied
        (unless it is encrypted)."""
        if len(payload) <= _COALESCE_BYTES:
            self.send_whole_frame(head + payload, len(head))
            return
        with self._sending():
            seal = self._seal
            tag = b""
            if seal is not None:
                sent, tag = seal.seal_tensor(head, payload)
            else:
                sent = payload
            self.sock.sendall(head)
            self.sock.sendall(sent)
            self.sock.sendall(tag)

    def send_whole_frame(self, frame: bytes, clear: int) -> None:
        """A small frame, built whole (its first `clear` bytes the length, type and
        header), tagged (and sealed) for this link and sent in one write."""
        try:
            with self._send_lock:
                seal = self._seal
                self.sock.sendall(frame if seal is None else seal.seal_frame(frame, clear))
                self.last_sent = time.monotonic()
        except OSError as exc:
            raise PeerLostError(self.peer, f"send failed ({exc})") from exc

    @contextlib.contextmanager
    def _sending(self) -> Iterator[None]:
        try:
            with self._send_lock:
                yield
                self.last_sent = time.monotonic()
        except OSError as exc:
            raise PeerLostError(self.peer, f"send failed ({exc})") from exc

    def _control_packet(self, frame: pb.Frame) -> bytes:
        """A control frame, stamped, serialized, length-prefixed and sealed (call with the
        send lock held: the seal numbers frames in the order they are written)."""
        frame.sent_at_ns = time.monotonic_ns()
        body = frame.SerializeToString()
        packet = _LEN.pack(1 + len(body)) + _CONTROL + body
        return packet if self._seal is None else self._seal.seal_frame(packet, 5)

    def recv_frame(self) -> pb.Frame:
        """The next control frame (an ERROR frame raises what it reports)."""
        while True:
            message = self.recv_message()
            if isinstance(message, torch.Tensor):
                self._refuse(f"expected a control frame, got a tensor {list(message.shape)}")
            if message.kind != pb.Frame.KEEPALIVE:
                return message

    def recv_message(self) -> pb.Frame | torch.Tensor:
        """The next frame, KEEPALIVE included (which only says the peer is alive)."""
        message = self._recv_message()
        self.last_received = time.monotonic()
        return message

    def _recv_message(self) -> pb.Frame | torch.Tensor:
        view = self._peek(4)
        if len(view) < 4:
            raise PeerLostError(self.peer, "connection closed")
        (size,) = _LEN.unpack_from(view)
        if size > MAX_FRAME_BYTES:  # refused outside _peek: its TensorMessageError must surface
            self._refuse(f"frame of {size} bytes exceeds the limit {MAX_FRAME_BYTES}")
        if len(view) < 4 + size:  # usually the whole frame came with its length
            view = self._peek(4 + size)
            if len(view) < 4 + size:
                raise PeerLostError(self.peer, "connection closed mid-frame")
        kind = view[4] if size else None
        if kind == _TENSOR_TYPE:
            return self._recv_tensor(view, 4 + size)
        if kind != _CONTROL_TYPE:
            self._refuse(f"undecodable frame (type {'missing' if kind is None else f'{kind:02x}'})")
        return self._recv_control(4 + size)

    def _recv_control(self, clear: int) -> pb.Frame:
        """The control frame whose length and type are buffered, `clear` bytes with its body."""
        total = clear + (TAG_BYTES if self._seal is not None else 0)
        view = self._peek(total)
        if len(view) < total:
            raise PeerLostError(self.peer, "connection closed mid-frame")
        plain = bytes(view[5:clear] if self._seal is None else self._open_frame(view[:total], 5))
        self._reader.skip(total)
        frame = pb.Frame()
        try:
            frame.ParseFromString(plain)
        except Exception as exc:  # protobuf raises DecodeError, a plain Exception subclass
            self._refuse(f"undecodable frame ({exc})")
        if frame.kind == pb.Frame.ERROR:
            raise _reported_error(self.peer, frame.message)
        if self._arrival is not None:
            self._arrival.hold(frame.sent_at_ns, total)
        return frame

    def _recv_tensor(self, view: memoryview, clear: int) -> torch.Tensor:
        """The tensor whose length-prefixed header is `view[:clear]` (buffered, not yet
        consumed); its bytes (and tag) follow. A small frame is checked and copied out of
        the read buffer whole: one copy, and its tag covers the bytes as they lie."""
        try:
            dtype, shape, nbytes, sent_at_ns = self._headers.parse(view[5:clear])
        except TensorMessageError as exc:
            self._refuse(str(exc))
        total = clear + nbytes + (TAG_BYTES if self._seal is not None else 0)
        if total > _WHOLE_FRAME_BYTES:
            return self._recv_large_tensor(clear, dtype, shape, sent_at_ns)
        if len(view) < total:
            view = self._peek(total)
            if len(view) < total:
                closed = "mid-tensor" if len(view) < clear + nbytes else "mid-frame"
                raise PeerLostError(self.peer, f"connection closed {closed}")
        if self._seal is None:
            payload: memoryview | bytes = view[clear:total]
        else:
            payload = self._open_frame(view[:total], clear)
        tensor = tensor_from_bytes(payload, dtype, shape)
        self._reader.skip(total)
        if self._arrival is not None:
            self._arrival.hold(sent_at_ns, total)
        return tensor

    def _recv_large_tensor(
        self, clear: int, dtype: torch.dtype, shape: tuple[int, ...], sent_at_ns: int
    ) -> torch.Tensor:
        """A tensor too large to buffer whole: read straight into its memory."""
        head = bytes(self._peek(clear)[:clear])
        self._reader.skip(clear)
        tensor = torch.empty(shape, dtype=dtype)
        into = tensor.view(-1).view(torch.uint8).numpy().data
        try:
            filled = self._reader.read_into(into)
        except ReadDeadlineError:
            raise self.silent() from None
        except (OSError, ValueError) as exc:
            raise PeerLostError(self.peer, f"receive failed ({exc})") from exc
        if filled < len(into):
            raise PeerLostError(self.peer, "connection closed mid-tensor")
        if self._seal is not None:
            self._open(lambda seal: seal.open_tensor(head, into, self._tag()))
        if self._arrival is not None:
            tag_bytes = TAG_BYTES if self._seal is not None else 0
            self._arrival.hold(sent_at_ns, clear + len(into) + tag_bytes)
        return tensor

    def _open_frame(self, frame: memoryview, clear: int) -> memoryview | bytes:
        """The plain payload of a whole buffered frame (see FrameSeal.open_frame)."""
        return self._open(lambda seal: seal.open_frame(frame, clear))

    def _tag(self) -> bytes:
        tag = self._read(TAG_BYTES)
        if len(tag) < TAG_BYTES:
            raise PeerLostError(self.peer, "connection closed mid-frame")
        return tag

    def _open(self, check: Callable[[FrameSeal], T]) -> T:
        """`check(seal)`, or: the link ends, the peer is told, PeerLostError says why."""
        assert self._seal is not None
        try:
            return check(self._seal)
        except FrameForgedError:
            message = f"frame from {self.peer} failed authentication: tampered or injected"
            with contextlib.suppress(PeerLostError):
                error = pb.Frame(kind=pb.Frame.ERROR, message=f"UNAUTHENTICATED: {message}")
                self.send_frame(error)
            self.close()
            log.warning("%s; link closed", message)
            raise PeerLostError(self.peer, f"{message}; link closed") from None

    def silent(self) -> PeerLostError:
        seconds = f"{self.deadline_s:g}" if self.deadline_s is not None else "?"
        return PeerLostError(
            self.peer, f"no data or keepalive from {self.peer} for {seconds} s: stopped or hung"
        )

    def _read(self, size: int) -> bytes:
        view = self._peek(size)
        data = bytes(view[:size])
        self._reader.skip(len(data))
        return data

    def _peek(self, size: int) -> memoryview:
        """At least `size` buffered bytes (fewer: the peer closed), not consumed."""
        deadline = self.deadline_s
        self._reader.deadline_ms = None if deadline is None else max(1, int(deadline * 1000))
        try:
            return self._reader.peek(size)
        except ReadDeadlineError:
            raise self.silent() from None
        except (OSError, ValueError) as exc:  # ValueError: read on a closed file
            raise PeerLostError(self.peer, f"receive failed ({exc})") from exc

    @property
    def buffered(self) -> bool:
        """Whether bytes of a frame already wait in the receive buffer."""
        return self._reader.buffered

    @property
    def spin_ns(self) -> int:
        """How long a read polls before it blocks."""
        return self._reader.spin_ns

    def _refuse(self, message: str) -> NoReturn:
        """Tells the peer what was wrong (INVALID_ARGUMENT), closes, raises."""
        with contextlib.suppress(PeerLostError):
            self.send_frame(pb.Frame(kind=pb.Frame.ERROR, message=f"INVALID_ARGUMENT: {message}"))
        self.close()
        raise TensorMessageError(f"from {self.peer}: {message}")

    # -- tensors --
    def send_tensor(self, t: torch.Tensor) -> None:
        send_tensor_to([self], t)

    def recv_tensor(self) -> torch.Tensor:
        while (tensor := self.recv_tensor_or_keepalive()) is None:
            pass
        return tensor

    def recv_tensor_or_keepalive(self) -> torch.Tensor | None:
        """The next tensor, or None for a KEEPALIVE (the peer is alive, still busy)."""
        message = self.recv_message()
        if isinstance(message, torch.Tensor):
            return message
        if message.kind == pb.Frame.KEEPALIVE:
            return None
        if message.kind == pb.Frame.BYE:
            raise PeerLostError(self.peer, "peer ended the session")
        self._refuse(f"expected a tensor, got a control frame of kind {message.kind}")

    def report_lost(self, lost: PeerLostError) -> None:
        """Best effort: tells this peer which rank was lost, then closes the link.

        Never waits on a sender thread or on a full socket for long: the point is that
        no rank is left waiting for a frame that will not come.
        """
        if self._send_lock.acquire(blocking=False):
            detail = str(lost).removeprefix(f"lost agent {lost.peer}: ")
            frame = pb.Frame(kind=pb.Frame.ERROR, message=f"{_LOST_PREFIX}{lost.peer}\n{detail}")
            try:
                self.sock.settimeout(REPORT_TIMEOUT_S)
                self.sock.sendall(self._control_packet(frame))
            except OSError:
                pass  # that peer is gone too; closing is all that is left
            finally:
                self._send_lock.release()
        self.close()

    def settimeout(self, seconds: float | None) -> None:
        self.sock.settimeout(seconds)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def wait_any(links: Sequence[Link], spin_ns: int, timeout_s: float | None = None) -> list[Link]:
    """The links a frame can be read from now; waits (polls for up to `spin_ns`, then
    blocks) until there is at least one, or `timeout_s` passed (then: none). One poll
    covers every socket."""
    ready = [link for link in links if link.buffered]
    if ready:
        return ready
    poller = select.poll()
    for link in links:
        poller.register(link.sock, select.POLLIN)
    now = time.monotonic_ns()
    deadline = now + spin_ns
    give_up = None if timeout_s is None else now + int(timeout_s * 1e9)
    while True:
        now = time.monotonic_ns()
        if now < deadline:
            block_ms: int | None = 0
        elif give_up is None:
            block_ms = None
        else:
            block_ms = max(0, (give_up - now + 999_999) // 1_000_000)
        events = poller.poll(block_ms)
        if events:
            fds = {fd for fd, _ in events}
            return [link for link in links if link.sock.fileno() in fds]
        if give_up is not None and time.monotonic_ns() >= give_up:
            return []
        os.sched_yield()


def tensor_packet(t: torch.Tensor) -> tuple[bytes, memoryview]:
    """A tensor frame: its length-prefixed header, and the bytes that follow it."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    header = raw_header(t, time.monotonic_ns())
    return _LEN.pack(1 + len(header)) + _TENSOR + header, tensor_bytes(t)


def send_tensor_to(links: Sequence[Link], t: torch.Tensor) -> None:
    """Sends `t` on every link in turn (the hub's fan-out): encoded once, tagged (and
    sealed) per link, since every link has its own key and sequence."""
    head, payload = tensor_packet(t)
    if len(payload) > _COALESCE_BYTES:
        for link in links:
            link.send_tensor_parts(head, payload)
        return
    frame = head + payload  # built once; each link tags (or seals) its own copy
    for link in links:
        link.send_whole_frame(frame, len(head))


def _reported_error(via: str, message: str) -> PeerLostError:
    """The error an ERROR frame stands for: a lost rank's name travels as its own."""
    if message.startswith(_LOST_PREFIX):
        lost, _, detail = message.removeprefix(_LOST_PREFIX).partition("\n")
        return PeerLostError(lost, f"{detail} (reported by {via})")
    return PeerLostError(via, f"peer reported: {message}")
