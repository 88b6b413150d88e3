"""Tagged messages over a communicator's links, received from any peer in any order.

The communicator's collectives match frames by order: every rank runs the same
sequence. A pipeline does not: an agent receives activations and gradients of
different micro-batches from different peers, in an order set by how fast each
peer computes. A `Mailbox` opened on a communicator takes over its links: one
reader thread per link files every incoming message under its tag, and `recv`
waits for a tag (from a given peer, or from any). Sends stay on the caller's
thread. A message is one int64 header tensor `[kind, a, b, c, count]` followed by
`count` tensors on the same link (frames on a link keep their order, and each link
has one reader, so a message is never interleaved with another).

Liveness is the communicator's: while a step is open (training opens one for the
whole session) every link carries keepalives and every read has a deadline, so a
lost or hung peer surfaces in the reader as PeerLostError naming it. Failures are
kept per link: `recv` from a given peer raises only when that peer's link failed
(so a rank can still hear the coordinator's verdict after another peer was lost);
`recv` from any peer raises on the first failure of any link it could come from.
An `interrupt` (a message of kind ABORT from rank 0) wakes every waiter.

Messages to oneself are filed directly (an agent holding two stages of a path).
Tensors are checked against the expected shape by the caller (`like=`), and a
header that is not [5] int64 or announces more than MAX_TENSORS is refused with the
peer named. Nothing is unpickled; tensors are raw frames as everywhere else.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Sequence

import torch

from edgecluster.comm.communicator import Communicator, _sum_in_rank_order
from edgecluster.errors import EdgeClusterError, PeerLostError, TensorMessageError
from edgecluster.net.link import Link

log = logging.getLogger(__name__)

Tag = tuple[int, int, int, int]  # (kind, a, b, c)
ABORT = 99  # kind of the message that interrupts every waiter (sent by rank 0)
MAX_TENSORS = 4096
RING_MIN_BYTES = 1 << 20  # all-reduce payloads from this size go by ring, smaller direct


class Interrupted(EdgeClusterError):
    """Rank 0 interrupted the work in progress (an ABORT message)."""


class Mailbox:
    def __init__(self, comm: Communicator) -> None:
        self.comm = comm
        self.rank = comm.rank
        self._cond = threading.Condition()
        self._box: dict[Tag, deque[tuple[int, list[torch.Tensor]]]] = defaultdict(deque)
        self._failed: dict[int, PeerLostError | TensorMessageError] = {}
        self._interrupt: str | None = None
        self._closed = False
        self._readers = [
            threading.Thread(target=self._read_loop, args=(peer,), daemon=True, name=f"mbox-{peer}")
            for peer in comm.peers()
        ]
        for reader in self._readers:
            reader.start()

    # ---- sending ----
    def send(self, dst: int, tag: Tag, *tensors: torch.Tensor) -> None:
        """`tensors` to `dst` under `tag`; to oneself it is filed at once."""
        if dst == self.rank:
            self._file(dst, tag, [t.detach().clone() for t in tensors])
            return
        header = torch.tensor([*tag, len(tensors)], dtype=torch.int64)
        link = self.comm.link(dst)
        try:
            link.send_tensor(header)
            for t in tensors:
                link.send_tensor(t)
        except PeerLostError as exc:
            self._fail(dst, exc)
            raise

    def interrupt_all(self, reason: str) -> None:
        """Rank 0: wakes every other rank's waiters with `reason` (best effort)."""
        data = torch.tensor(list(reason.encode()[:200]), dtype=torch.uint8)
        for peer in self.comm.peers():
            with contextlib.suppress(PeerLostError, OSError):
                self.send(peer, (ABORT, 0, 0, 0), data)

    # ---- receiving ----
    def recv(
        self,
        tag: Tag,
        src: int | None = None,
        *,
        like: Sequence[torch.Tensor] | None = None,
        timeout_s: float | None = None,
        interruptible: bool = True,
    ) -> tuple[int, list[torch.Tensor]]:
        """The next message under `tag` (from `src`, or from any peer): (sender, tensors).

        `like` checks the tensors' count, shapes and dtypes. Raises PeerLostError when
        the awaited peer's link (any link, for any sender) failed first, Interrupted
        when rank 0 interrupted (unless not `interruptible`), TimeoutError after
        `timeout_s`."""
        give_up = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while True:
                found = self._take(tag, src)
                if found is not None:
                    break
                self._raise_if_failed(src, interruptible)
                wait = None if give_up is None else give_up - time.monotonic()
                if wait is not None and wait <= 0:
                    raise TimeoutError(f"no message {tag} from {self._who(src)} in {timeout_s} s")
                self._cond.wait(wait)
        sender, tensors = found
        if like is not None:
            _check_like(self.comm.peer_name(sender), tag, tensors, like)
        return sender, tensors

    def _take(self, tag: Tag, src: int | None) -> tuple[int, list[torch.Tensor]] | None:
        queue = self._box.get(tag)
        if not queue:
            return None
        if src is None:
            return queue.popleft()
        for i, (sender, tensors) in enumerate(queue):
            if sender == src:
                del queue[i]
                return sender, tensors
        return None

    def _raise_if_failed(self, src: int | None, interruptible: bool) -> None:
        if interruptible and self._interrupt is not None:
            raise Interrupted(self._interrupt)
        if src is not None and src in self._failed:
            raise self._failed[src]
        if src is None and self._failed:
            raise next(iter(self._failed.values()))
        if self._closed:
            raise PeerLostError(self._who(src), "the session was closed")

    def _who(self, src: int | None) -> str:
        return "any peer" if src is None else self.comm.peer_name(src)

    @property
    def failures(self) -> dict[int, PeerLostError | TensorMessageError]:
        with self._cond:
            return dict(self._failed)

    # ---- readers ----
    def _read_loop(self, peer: int) -> None:
        link = self.comm.link(peer)
        try:
            while True:
                header = _next_tensor(link)
                if header.dtype != torch.int64 or tuple(header.shape) != (5,):
                    raise TensorMessageError(
                        f"{link.peer} sent a {header.dtype} {list(header.shape)} tensor where a "
                        "message header ([5] int64) was due: the peers run different versions"
                    )
                kind, a, b, c, count = (int(v) for v in header.tolist())
                if not 0 <= count <= MAX_TENSORS:
                    raise TensorMessageError(f"{link.peer} announced {count} tensors in a message")
                tensors = [_next_tensor(link) for _ in range(count)]
                if kind == ABORT and peer == 0:
                    reason = bytes(tensors[0].tolist()).decode(errors="replace") if tensors else ""
                    with self._cond:
                        self._interrupt = reason or "interrupted by the coordinator"
                        self._cond.notify_all()
                    continue
                self._file(peer, (kind, a, b, c), tensors)
        except (PeerLostError, TensorMessageError) as exc:
            self._fail(peer, exc)
        except (OSError, ValueError) as exc:  # a closed socket under a reader
            self._fail(peer, PeerLostError(link.peer, f"link closed ({exc})"))

    def _file(self, sender: int, tag: Tag, tensors: list[torch.Tensor]) -> None:
        with self._cond:
            self._box[tag].append((sender, tensors))
            self._cond.notify_all()

    def _fail(self, peer: int, exc: PeerLostError | TensorMessageError) -> None:
        with self._cond:
            if not self._closed:
                self._failed.setdefault(peer, exc)
            self._cond.notify_all()

    def clear_interrupt(self) -> None:
        with self._cond:
            self._interrupt = None

    # ---- collectives among a group, over tags ----
    def all_reduce(self, tensor: torch.Tensor, ranks: Sequence[int], tag: Tag) -> torch.Tensor:
        """The sum over `ranks` (same order on every member) of each member's `tensor`,
        added in float32 in a fixed order, so every member gets the same bits. Large
        payloads go by ring (2(n-1) steps of 1/n of the payload), small ones direct."""
        group = list(ranks)
        if self.rank not in group:
            raise ValueError(f"rank {self.rank} is not in the group {group}")
        if len(group) == 1:
            return tensor
        if tensor.numel() * tensor.element_size() >= RING_MIN_BYTES:
            return self._ring(tensor, group, tag)
        for peer in group:
            if peer != self.rank:
                self.send(peer, tag, tensor)
        partials = {self.rank: tensor}
        for peer in group:
            if peer != self.rank:
                partials[peer] = self.recv(tag, peer, like=[tensor], interruptible=False)[1][0]
        return _sum_in_rank_order(partials, tensor.dtype)

    def _ring(self, tensor: torch.Tensor, group: list[int], tag: Tag) -> torch.Tensor:
        n, me = len(group), group.index(self.rank)
        kind, a, b, _ = tag
        work = tensor.to(torch.float32, copy=True).reshape(-1)
        chunks = list(torch.tensor_split(work, n))
        nxt, prv = group[(me + 1) % n], group[(me - 1) % n]
        for step in range(n - 1):  # reduce-scatter: chunk (me-step-1) gathers the sum
            out, into = chunks[(me - step) % n], chunks[(me - step - 1) % n]
            self.send(nxt, (kind, a, b, step), out)
            into += self.recv((kind, a, b, step), prv, like=[into], interruptible=False)[1][0]
        for step in range(n - 1):  # all-gather: the reduced chunks flow on
            out, into = chunks[(me + 1 - step) % n], chunks[(me - step) % n]
            self.send(nxt, (kind, a, b, n + step), out)
            into.copy_(
                self.recv((kind, a, b, n + step), prv, like=[into], interruptible=False)[1][0]
            )
        return work.reshape(tensor.shape).to(tensor.dtype)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def _next_tensor(link: Link) -> torch.Tensor:
    while True:
        message = link.recv_tensor_or_keepalive()
        if message is not None:
            return message


def _check_like(
    peer: str, tag: Tag, tensors: Sequence[torch.Tensor], like: Sequence[torch.Tensor]
) -> None:
    if len(tensors) != len(like):
        raise TensorMessageError(
            f"{peer} sent {len(tensors)} tensors under {tag}, {len(like)} were expected"
        )
    for got, want in zip(tensors, like, strict=True):
        if got.shape != want.shape or got.dtype != want.dtype:
            raise TensorMessageError(
                f"{peer} sent a {got.dtype} {list(got.shape)} tensor under {tag} where a "
                f"{want.dtype} {list(want.shape)} one was expected"
            )
