"""The mailbox: tagged messages over real loopback links, taken in any order.

Three ranks in threads of this process, each with its own listener and sockets (the
training tests run the same code across processes). Checked: messages are taken by
tag whatever order they arrived in; the all-reduce gives every member the same bits
for small (direct) and large (ring) payloads; a message that is not a header is
refused naming the peer; a lost peer is named to a waiter on that peer but not to a
waiter on another; rank 0 can interrupt every waiter.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

from edgecluster.comm.communicator import Communicator, SessionConfig
from edgecluster.comm.mailbox import RING_MIN_BYTES, Interrupted, Mailbox
from edgecluster.errors import PeerLostError, TensorMessageError
from edgecluster.net.datachannel import DataListener

KEY = b"k" * 32


@pytest.fixture
def boxes() -> Iterator[list[Mailbox]]:
    listeners = [DataListener("127.0.0.1") for _ in range(3)]
    endpoints = tuple(f"127.0.0.1:{listener.port}" for listener in listeners)
    comms: list[Communicator | None] = [None] * 3

    def connect(rank: int) -> None:
        config = SessionConfig(session_id="mbox", session_key=KEY, rank=rank, endpoints=endpoints)
        listeners[rank].expect("mbox", KEY)
        comms[rank] = Communicator.connect(config, listeners[rank], ["r0", "r1", "r2"])

    threads = [threading.Thread(target=connect, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(c is not None for c in comms), "the three ranks did not connect"
    boxes = [Mailbox(c) for c in comms if c is not None]
    try:
        yield boxes
    finally:
        for box in boxes:
            box.close()
            box.comm.close()
        for listener in listeners:
            listener.close()


def test_messages_are_taken_by_tag_in_any_order(boxes: list[Mailbox]) -> None:
    for i in range(3):
        boxes[1].send(0, (5, 0, i, 0), torch.full((2,), float(i)))
    boxes[2].send(0, (5, 0, 9, 0), torch.ones(1), torch.zeros(3, dtype=torch.int64))
    sender, (t,) = boxes[0].recv((5, 0, 2, 0), like=[torch.zeros(2)])
    assert sender == 1 and t.tolist() == [2.0, 2.0]
    sender, tensors = boxes[0].recv((5, 0, 9, 0), src=2)
    assert sender == 2 and [x.dtype for x in tensors] == [torch.float32, torch.int64]
    assert boxes[0].recv((5, 0, 0, 0), src=1)[1][0].tolist() == [0.0, 0.0]
    boxes[1].send(1, (6, 0, 0, 0), torch.ones(1))  # to itself: filed at once
    assert boxes[1].recv((6, 0, 0, 0), src=1, timeout_s=1)[0] == 1
    with pytest.raises(TensorMessageError, match="r1 sent a torch.float32 \\[2\\] tensor"):
        boxes[1].send(0, (7, 0, 0, 0), torch.ones(2))
        boxes[0].recv((7, 0, 0, 0), src=1, like=[torch.zeros(3)])
    with pytest.raises(TimeoutError):
        boxes[0].recv((8, 0, 0, 0), timeout_s=0.2)


@pytest.mark.parametrize("numel", [7, RING_MIN_BYTES // 4 + 5])  # direct, then ring
def test_all_reduce_gives_every_member_the_same_sum(boxes: list[Mailbox], numel: int) -> None:
    inputs = [torch.randn(numel, generator=torch.Generator().manual_seed(r)) for r in range(3)]
    results: list[torch.Tensor | None] = [None] * 3

    def reduce(rank: int) -> None:
        results[rank] = boxes[rank].all_reduce(inputs[rank], [0, 1, 2], (10, 1, 0, 0))

    threads = [threading.Thread(target=reduce, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r is not None for r in results)
    assert all(torch.equal(results[0], r) for r in results[1:])  # type: ignore[arg-type]
    assert torch.allclose(results[0], sum(inputs), atol=1e-5)  # type: ignore[arg-type]


def test_a_stray_tensor_is_refused_naming_the_peer(boxes: list[Mailbox]) -> None:
    boxes[2].comm.link(0).send_tensor(torch.ones(4))  # no header: not a message
    with pytest.raises(TensorMessageError, match="r2 sent a torch.float32 \\[4\\] tensor where"):
        boxes[0].recv((1, 0, 0, 0), src=2, timeout_s=10)


def test_a_lost_peer_is_named_only_to_who_waits_on_it(boxes: list[Mailbox]) -> None:
    boxes[2].comm.close()  # rank 2 vanishes
    with pytest.raises(PeerLostError, match="r2"):
        boxes[0].recv((1, 0, 0, 0), src=2, timeout_s=10)
    boxes[1].send(0, (3, 0, 0, 0), torch.ones(1))  # rank 1 is still heard
    assert boxes[0].recv((3, 0, 0, 0), src=1, timeout_s=10)[0] == 1
    with pytest.raises(PeerLostError):  # from any peer: the loss is news
        boxes[0].recv((4, 0, 0, 0), timeout_s=10)


def test_rank_0_interrupts_every_waiter(boxes: list[Mailbox]) -> None:
    boxes[0].interrupt_all("agent x was lost")
    with pytest.raises(Interrupted, match="agent x was lost"):
        boxes[1].recv((1, 0, 0, 0), src=2, timeout_s=10)
    boxes[2].send(1, (2, 0, 0, 0), torch.ones(1))  # not interruptible: the verdict wait
    assert boxes[1].recv((2, 0, 0, 0), src=2, timeout_s=10, interruptible=False)[0] == 2
