"""Communicator: all_reduce (sum), broadcast, send and recv among a session's ranks.

Model code calls this, never a transport. Rank 0 is the hub (the coordinator).
Links form a full mesh, opened once per session and kept: rank i dials every rank
j < i and accepts from every rank j > i. Collectives run in the same order on
every rank, so frames on a link need no tags.

Collectives run over the whole session or over a group of ranks (`ranks`, in the
same order on every member): serving reduces among the agents only, so the hub
sleeps through the layers.

Two all-reduce algorithms:
- star: every rank sends its partial to the group's first rank (the centre), which
  adds and sends the sum back. Two link latencies whatever the rank count
  (TPI-LLM's choice for latency-bound edge links).
- direct: every rank sends its partial to every other rank and adds them all
  itself, in rank order. One link latency, N-1 sends and receives per rank. Only
  payloads up to 64 KiB go direct (sending before receiving could fill the socket
  buffers of large ones); larger ones go by star.
- ring: reduce-scatter then all-gather over the ring, 2(N-1) link latencies, each
  carrying 1/N of the payload; better for large payloads on bandwidth-bound links.

Emulated links (experiments, the testbed): each link holds the frames it receives
as the session's delay and bandwidth from that peer say (`SessionConfig.
link_emulation`, a per-pair matrix from a cluster file), so one box reproduces an
uneven network.

Sums accumulate in float32 and are cast back once, so every rank gets the same bits.

A lost peer fails the whole session, not one rank: the rank that notices tells every
other peer which rank was lost and closes its links, so every rank raises
PeerLostError naming the lost one instead of waiting for a frame that will not come.

Liveness: inside a step (`with comm.step():`, or begin_step / end_step) every read
has a deadline (`read_deadline_s`, default EDGE_READ_DEADLINE_S or 5 s) and a
background thread sends a KEEPALIVE on every link that had no send for
`keepalive_interval_s` (every rank takes part in a step, and every receive skips
keepalives, so none piles up for long), so a rank that is busy computing is not
taken for a hung one, and one that is stopped (SIGSTOP) or hung is named within the
deadline. Between steps nothing is sent and reads wait forever: an idle session must
neither time out nor pile keepalives into a socket nobody reads.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from edgecluster.comm.session_config import (  # noqa: F401 (re-exported: the session's seam)
    ALGORITHMS,
    DEFAULT_READ_DEADLINE_S,
    DIRECT_MAX_BYTES,
    MB,
    SessionConfig,
    default_read_deadline_s,
    serving_algorithm,
)
from edgecluster.errors import PeerLostError, TensorMessageError
from edgecluster.net.datachannel import (
    DataListener,
    Link,
    dial,
    send_tensor_to,
    wait_any,
)

log = logging.getLogger(__name__)

_ASYNC_SEND_BYTES = 128 << 10


def _sum_in_rank_order(partials: dict[int, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The sum in float32, added in rank order whatever order the partials arrived in
    (so every run, and every rank that adds them, gets the same bits), cast once."""
    total = torch.zeros(next(iter(partials.values())).shape, dtype=torch.float32)
    for rank in sorted(partials):
        total += partials[rank]
    return total.to(dtype)


def _dial_when_expected(config: SessionConfig, peer: int, name: str) -> Link:
    """Dials `peer`, retrying while it does not expect the session yet: the
    coordinator opens a session on all agents in parallel, so a lower rank may still
    be loading its shard when a higher one dials it."""
    deadline = time.monotonic() + config.connect_timeout_s
    emulation = config.link_emulation(peer)
    while True:
        try:
            return dial(
                config.endpoints[peer],
                session_id=config.session_id,
                key=config.session_key,
                rank=config.rank,
                peer=name,
                link_delay_ms=emulation.delay_ms,
                bandwidth_bytes_per_s=emulation.bandwidth_bytes_per_s,
                timeout_s=max(0.1, deadline - time.monotonic()),
                encrypt=config.encrypt,
            )
        except PeerLostError as exc:
            if "unknown session" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Communicator:
    """Collectives over kept data-channel links. One caller thread at a time."""

    def __init__(self, config: SessionConfig, links: dict[int, Link]) -> None:
        self.config = config
        self.rank = config.rank
        self.world_size = config.world_size
        self._links = links
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="comm-send")
        self._aborted = False
        self._step_started: float | None = None  # monotonic start of the step in progress
        self._stepping = threading.Condition()
        self._closed = False
        if links:
            keepalive = threading.Thread(
                target=self._keepalive_loop, name="comm-keepalive", daemon=True
            )
            keepalive.start()

    @classmethod
    def connect(
        cls, config: SessionConfig, listener: DataListener, names: Sequence[str] | None = None
    ) -> Communicator:
        """Opens the session's mesh; `listener` must already expect this session."""
        names = names or [f"rank {r}" for r in range(config.world_size)]
        links: dict[int, Link] = {}
        try:
            for peer in range(config.rank):
                links[peer] = _dial_when_expected(config, peer, names[peer])
            for peer in range(config.rank + 1, config.world_size):
                link = listener.take(config.session_id, peer, config.connect_timeout_s)
                link.peer = names[peer]
                link.emulate(config.link_emulation(peer))  # not read from yet
                links[peer] = link
        except Exception:
            for link in links.values():
                link.close()
            raise
        how = "sealed (AEAD)" if config.encrypt else "authenticated (MAC)"
        log.info("session %s: %d links, frames %s", config.session_id[:8], len(links), how)
        emulated = [
            f"{names[peer]} {e.delay_ms:g} ms, "
            + (f"{e.bandwidth_bytes_per_s / MB:g} MB/s" if e.bandwidth_bytes_per_s else "unlimited")
            for peer, e in ((peer, link.emulation) for peer, link in links.items())
            if e.active
        ]
        if emulated:
            log.info(
                "session %s: emulated links from %s", config.session_id[:8], "; ".join(emulated)
            )
        return cls(config, links)

    def link(self, rank: int) -> Link:
        return self._links[rank]

    def peers(self) -> list[int]:
        """The other ranks, ascending."""
        return sorted(self._links)

    def peer_name(self, rank: int) -> str:
        """`rank`'s name for messages (the name its link was opened with)."""
        if rank == self.rank:
            return f"rank {rank} (this one)"
        link = self._links.get(rank)
        return link.peer if link is not None else f"rank {rank}"

    # ---- liveness ----
    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """A step: reads have deadlines, busy ranks send keepalives (see the module doc)."""
        self.begin_step()
        try:
            yield
        finally:
            self.end_step()

    def begin_step(self) -> None:
        with self._stepping:
            self._step_started = time.monotonic()
            for link in self._links.values():
                link.deadline_s = self.config.read_deadline_s
            self._stepping.notify_all()

    def end_step(self) -> None:
        with self._stepping:
            self._step_started = None
            for link in self._links.values():
                link.deadline_s = None

    def _keepalive_loop(self) -> None:
        interval = self.config.keepalive_interval_s
        while True:
            with self._stepping:
                while self._step_started is None and not self._closed:
                    self._stepping.wait()
                if self._closed:
                    return
                started = self._step_started
                assert started is not None
            now = time.monotonic()
            for link in list(self._links.values()):
                if now - max(link.last_sent, started) >= interval:
                    link.send_keepalive()
            time.sleep(interval / 2)

    # ---- point to point ----
    def send(self, tensor: torch.Tensor, dst: int) -> None:
        try:
            self._send(tensor, dst)
        except PeerLostError as exc:
            self._abort(exc)
            raise

    def recv(self, src: int) -> torch.Tensor:
        try:
            return self._recv(src)
        except PeerLostError as exc:
            self._abort(exc)
            raise

    def recv_watching(self, src: int) -> torch.Tensor:
        """`src`'s next tensor, reading every other link meanwhile: their keepalives
        (each peer is held to the read deadline) and the error a peer reports when it
        lost another, so a rank waiting on one peer still notices any loss at once."""
        try:
            received = self._gather_partials(None, list(self._links), until=src)
            return received[src]
        except PeerLostError as exc:
            self._abort(exc)
            raise

    # ---- collectives ----
    def broadcast(self, tensor: torch.Tensor | None, src: int = 0) -> torch.Tensor:
        """Every rank gets `src`'s tensor (others pass None). Star-shaped."""
        try:
            if self.rank != src:
                return self._recv(src)
            assert tensor is not None, "the broadcast source must pass a tensor"
            send_tensor_to(list(self._links.values()), tensor)
            return tensor
        except PeerLostError as exc:
            self._abort(exc)
            raise

    def all_reduce(self, tensor: torch.Tensor, ranks: Sequence[int] | None = None) -> torch.Tensor:
        """Sum of every member's `tensor`, returned on every member of `ranks` (default:
        all ranks). A new tensor, or `tensor` itself in a group of one."""
        group = self._group(ranks)
        if len(group) == 1:
            return tensor
        try:
            algorithm = self.config.algorithm
            if algorithm == "direct" and tensor.numel() * tensor.element_size() > DIRECT_MAX_BYTES:
                algorithm = "star"
            if algorithm == "star":
                return self._star_all_reduce(tensor, group)
            if algorithm == "direct":
                return self._direct_all_reduce(tensor, group)
            return self._ring_all_reduce(tensor, group)
        except PeerLostError as exc:
            self._abort(exc)
            raise

    def reduce(
        self, tensor: torch.Tensor, dst: int = 0, ranks: Sequence[int] | None = None
    ) -> torch.Tensor | None:
        """Sum at `dst` only (star); saves the return trip when others need no result."""
        group = self._group(ranks)
        if dst not in group:
            raise ValueError(f"reduce to rank {dst}, which is not in the group {list(group)}")
        try:
            return self._reduce(tensor, dst, group)
        except PeerLostError as exc:
            self._abort(exc)
            raise

    def _group(self, ranks: Sequence[int] | None) -> tuple[int, ...]:
        if ranks is None:
            return tuple(range(self.world_size))
        group = tuple(ranks)
        if self.rank not in group or len(set(group)) != len(group):
            raise ValueError(f"rank {self.rank} is not a member of the group {list(group)}")
        return group

    def _send(self, tensor: torch.Tensor, dst: int) -> None:
        self._links[dst].send_tensor(tensor)

    def _recv(self, src: int) -> torch.Tensor:
        return self._links[src].recv_tensor()

    def _recv_like(self, src: int, like: torch.Tensor) -> torch.Tensor:
        """A peer's contribution to a reduction; must match ours in shape."""
        return self._check_like(src, self._recv(src), like)

    @staticmethod
    def _check_like(src: int, incoming: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if incoming.shape != like.shape:
            raise ValueError(
                f"rank {src} contributed shape {tuple(incoming.shape)} to a reduction of "
                f"shape {tuple(like.shape)}; every rank must pass the same shape"
            )
        return incoming

    def _reduce(self, tensor: torch.Tensor, dst: int, group: Sequence[int]) -> torch.Tensor | None:
        if self.rank != dst:
            self._send(tensor, dst)
            return None
        partials = self._gather_partials(tensor, [r for r in group if r != dst])
        partials[dst] = tensor
        return _sum_in_rank_order(partials, tensor.dtype)

    def _gather_partials(
        self, like: torch.Tensor | None, peers: Sequence[int], until: int | None = None
    ) -> dict[int, torch.Tensor]:
        """Every peer's partial, decoded as it arrives (shaped `like`); with `until`,
        only that peer's tensor is awaited and a tensor from another is refused.

        Waiting for the first one blocks: the others are still computing, and a polling
        centre would take cycles from a rank that shares its core. The rest arrive
        close together, so waiting for them polls first (see polling_reader).
        """
        pending = {r: self._links[r] for r in peers}
        partials: dict[int, torch.Tensor] = {}
        heard = dict.fromkeys(pending, time.monotonic())  # a frame or keepalive, per peer
        while pending and (until is None or until not in partials):
            spin_ns = next(iter(pending.values())).spin_ns if partials else 0
            timeout = self._gather_timeout(pending, heard)
            ready = wait_any(list(pending.values()), spin_ns, timeout)
            if not ready:
                self._raise_if_silent(pending, heard)
            for link in ready:
                peer = next(r for r, candidate in pending.items() if candidate is link)
                message = link.recv_tensor_or_keepalive()
                heard[peer] = time.monotonic()
                if message is None:
                    continue
                if until is not None and peer != until:
                    raise TensorMessageError(
                        f"rank {peer} sent a tensor {list(message.shape)} while rank "
                        f"{until}'s was awaited: the ranks are out of step"
                    )
                partials[peer] = message if like is None else self._check_like(peer, message, like)
                del pending[peer]
        return partials

    def _gather_timeout(self, pending: dict[int, Link], heard: dict[int, float]) -> float | None:
        """How long the gather may wait for any frame before a peer is overdue."""
        deadline = next(iter(pending.values())).deadline_s
        if deadline is None:
            return None
        return max(0.0, min(heard[r] for r in pending) + deadline - time.monotonic())

    def _raise_if_silent(self, pending: dict[int, Link], heard: dict[int, float]) -> None:
        now = time.monotonic()
        for peer, link in pending.items():
            if link.deadline_s is not None and now - heard[peer] >= link.deadline_s:
                raise link.silent()

    def abort(self, lost: PeerLostError) -> None:
        """Tells every other peer that `lost`'s peer was lost and closes the links."""
        self._abort(lost)

    def _abort(self, lost: PeerLostError) -> None:
        """Tells every other peer which rank was lost and closes the links (once)."""
        if self._aborted:
            return
        self._aborted = True
        log.warning("session %s ends: %s", self.config.session_id, lost)
        for link in self._links.values():
            link.report_lost(lost)

    def _star_all_reduce(self, tensor: torch.Tensor, group: Sequence[int]) -> torch.Tensor:
        centre = group[0]
        if self.rank != centre:
            self._send(tensor, centre)
            return self._recv_like(centre, tensor)
        reduced = self._reduce(tensor, centre, group)
        assert reduced is not None
        send_tensor_to([self._links[r] for r in group[1:]], reduced)
        return reduced

    def _direct_all_reduce(self, tensor: torch.Tensor, group: Sequence[int]) -> torch.Tensor:
        others = [r for r in group if r != self.rank]
        send_tensor_to([self._links[r] for r in others], tensor)
        partials = self._gather_partials(tensor, others)
        partials[self.rank] = tensor
        return _sum_in_rank_order(partials, tensor.dtype)

    def _ring_all_reduce(self, tensor: torch.Tensor, group: Sequence[int]) -> torch.Tensor:
        n, me = len(group), group.index(self.rank)
        work = tensor.to(torch.float32, copy=True).reshape(-1)
        chunks = list(torch.tensor_split(work, n))
        nxt, prv = group[(me + 1) % n], group[(me - 1) % n]
        for step in range(n - 1):  # reduce-scatter: chunk (me-step) flows forward
            target = chunks[(me - step - 1) % n]
            target += self._exchange(chunks[(me - step) % n], nxt, prv, target)
        for step in range(n - 1):  # all-gather: the reduced chunk (me+1-step) flows on
            target = chunks[(me - step) % n]
            target.copy_(self._exchange(chunks[(me + 1 - step) % n], nxt, prv, target))
        return work.reshape(tensor.shape).to(tensor.dtype)

    def _exchange(self, out: torch.Tensor, dst: int, src: int, like: torch.Tensor) -> torch.Tensor:
        """Sends `out` to dst while receiving a `like`-shaped tensor from src (a thread
        sends large payloads)."""
        if out.numel() * out.element_size() < _ASYNC_SEND_BYTES:
            self._send(out, dst)
            return self._recv_like(src, like)
        pending = self._sender.submit(self._send, out, dst)
        incoming = self._recv_like(src, like)
        pending.result()
        return incoming

    def close(self) -> None:
        """Idempotent; safe while another thread closes it too (a failed step and a
        re-plan can both close a session's links)."""
        with self._stepping:
            self._closed = True
            self._stepping.notify_all()
        for link in list(self._links.values()):
            link.close()
        self._links.clear()
        self._sender.shutdown(wait=False)
