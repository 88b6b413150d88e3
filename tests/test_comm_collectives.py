"""Collectives across real processes on 127.0.0.1, checked against a local sum.

One pool of six rank processes serves every case: a session of N nodes runs on the
pool's first N workers, opened once and kept for all its cases. Timing is asserted
only as the lower bound the injected link delay guarantees, never as a speed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.comm_worker import RankPool

NODE_COUNTS = (2, 3, 4, 5, 6)
ALGORITHMS = ("star", "ring")
SMALL_PAYLOAD_ALGORITHMS = ("direct",)  # direct up to 64 KiB, star above
HALF_AND_FULL = ("float32", "bfloat16", "float16")
SHAPES = ((1,), (7,), (7, 143), (256, 1024))  # one element, odd sizes, 1 MiB of fp32
BIG_SHAPE = (16, 1 << 20)  # 64 MiB of fp32


class Sessions:
    """Sessions of the shared pool, opened on first use and kept."""

    def __init__(self, pool: RankPool) -> None:
        self.pool = pool
        self._open: dict[tuple[int, str, float], str] = {}

    def get(self, num_nodes: int, algorithm: str = "star", delay_ms: float = 0.0) -> str:
        key = (num_nodes, algorithm, delay_ms)
        if key not in self._open:
            members = list(range(num_nodes))
            self._open[key] = self.pool.open_session(members, algorithm, delay_ms)
        return self._open[key]


@pytest.fixture(scope="module")
def sessions() -> Iterator[Sessions]:
    pool = RankPool(max(NODE_COUNTS))
    try:
        yield Sessions(pool)
    finally:
        pool.close()


def check_sum(
    answers: list[dict[str, Any]], shape: tuple[int, ...], dtype: str, label: str
) -> None:
    """Every rank holds the same bits, of the right shape and dtype, close to the sum."""
    digests = {a["digest"] for a in answers}
    assert len(digests) == 1, f"{label}: ranks disagree bit-wise"
    for rank, a in enumerate(answers):
        assert a["shape"] == shape, f"{label}: rank {rank} got shape {a['shape']}"
        assert a["dtype"] == dtype, f"{label}: rank {rank} got {a['dtype']}"
        assert a["err_ratio"] <= 1.0, f"{label}: rank {rank} off by {a['err_ratio']:.2f}x tol"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("num_nodes", NODE_COUNTS)
def test_all_reduce_matches_local_sum(sessions: Sessions, num_nodes: int, algorithm: str) -> None:
    session = sessions.get(num_nodes, algorithm)
    for seed, (dtype, shape) in enumerate((d, s) for d in HALF_AND_FULL for s in SHAPES):
        answers = sessions.pool.run(session, "all_reduce", seed=seed, shape=shape, dtype=dtype)
        check_sum(answers, shape, dtype, f"{algorithm} {num_nodes} nodes {dtype} {shape}")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("num_nodes", (2, 3))
def test_all_reduce_of_64_mib_is_one_message_per_hop(
    sessions: Sessions, num_nodes: int, algorithm: str
) -> None:
    """A large tensor streams as one message (read straight into its tensor), so each
    rank receives exactly the messages its algorithm needs: a star's hub one partial per
    peer and every other rank the sum; a ring 2(N-1) slices."""
    session = sessions.get(num_nodes, algorithm)
    answers = sessions.pool.run(session, "all_reduce", seed=99, shape=BIG_SHAPE, dtype="float32")
    check_sum(answers, BIG_SHAPE, "float32", f"{algorithm} {num_nodes} nodes 64 MiB")
    star = [num_nodes - 1] + [1] * (num_nodes - 1)
    for rank, a in enumerate(answers):
        expected = 2 * (num_nodes - 1) if algorithm == "ring" else star[rank]
        assert a["tensors"] == expected, f"rank {rank} received {a['tensors']} tensors"


@pytest.mark.parametrize("num_nodes", (3, 5))
def test_star_sum_is_in_rank_order_whatever_order_partials_arrive(
    sessions: Sessions, num_nodes: int
) -> None:
    """The hub decodes partials as they arrive but adds them in rank order, so a run's
    bits do not depend on which agent was fastest."""
    session = sessions.get(num_nodes)
    for stagger_ms in (0.0, 20.0):  # 20 ms apart: they arrive last rank first
        answers = sessions.pool.run(
            session, "all_reduce", seed=3, shape=(1, 576), dtype="float32", stagger_ms=stagger_ms
        )
        check_sum(answers, (1, 576), "float32", f"star {num_nodes} nodes stagger {stagger_ms}")
        assert all(a["rank_order_exact"] for a in answers), f"stagger {stagger_ms} ms"


@pytest.mark.parametrize("algorithm", SMALL_PAYLOAD_ALGORITHMS)
@pytest.mark.parametrize("num_nodes", (2, 4))
def test_direct_all_reduce_gives_every_rank_the_same_sum(
    sessions: Sessions, num_nodes: int, algorithm: str
) -> None:
    """Every rank adds everyone's partial itself, in rank order: the same bits on
    every rank, whatever order the partials arrive in; large payloads go by star."""
    session = sessions.get(num_nodes, algorithm)
    for stagger_ms in (0.0, 20.0):
        answers = sessions.pool.run(
            session, "all_reduce", seed=4, shape=(1, 576), dtype="float32", stagger_ms=stagger_ms
        )
        check_sum(answers, (1, 576), "float32", f"{algorithm} {num_nodes} stagger {stagger_ms}")
        assert all(a["rank_order_exact"] for a in answers), f"stagger {stagger_ms} ms"
    # bf16 [7, 143] goes direct; fp32 [256, 1024] is 1 MiB: it goes by star
    for dtype, shape in (("bfloat16", (7, 143)), ("float32", (256, 1024))):
        answers = sessions.pool.run(session, "all_reduce", seed=6, shape=shape, dtype=dtype)
        check_sum(answers, shape, dtype, f"{algorithm} {num_nodes} nodes {dtype} {shape}")


@pytest.mark.parametrize("algorithm", ("star", "direct"))
def test_a_group_of_ranks_reduces_among_itself(sessions: Sessions, algorithm: str) -> None:
    """Serving's shape: the agents (ranks 1..N) all-reduce while the hub (rank 0)
    sits out; the sum is the group's, in the group's rank order, on every member."""
    session = sessions.get(4, algorithm)
    for group in ([1, 2, 3], [1, 3], [2]):
        answers = sessions.pool.run(
            session, "all_reduce", seed=21, shape=(3, 576), dtype="float32", ranks=group
        )
        assert [r for r, a in enumerate(answers) if a is not None] == group
        members = [a for a in answers if a is not None]
        check_sum(members, (3, 576), "float32", f"{algorithm} group {group}")
        if algorithm != "ring":
            assert all(a["rank_order_exact"] for a in members), f"group {group}"


def test_single_node_session_returns_its_own_input(sessions: Sessions) -> None:
    answers = sessions.pool.run(
        sessions.get(1), "all_reduce", seed=5, shape=(7, 143), dtype="bfloat16"
    )
    check_sum(answers, (7, 143), "bfloat16", "1 node")


@pytest.mark.parametrize("num_nodes", NODE_COUNTS)
def test_broadcast_from_hub_and_from_another_rank(sessions: Sessions, num_nodes: int) -> None:
    session = sessions.get(num_nodes)
    for src in (0, num_nodes - 1):
        for dtype, shape in (("bfloat16", (7, 143)), ("float32", (1,))):
            answers = sessions.pool.run(
                session, "broadcast", src=src, seed=src, shape=shape, dtype=dtype
            )
            assert len({a["digest"] for a in answers}) == 1
            for rank, a in enumerate(answers):
                assert a["err_ratio"] == 0.0, f"rank {rank}: not the bits rank {src} sent"
                assert (a["shape"], a["dtype"]) == (shape, dtype)


def test_send_recv_between_ranks_that_are_not_the_hub(sessions: Sessions) -> None:
    session = sessions.get(4)
    for src, dst in ((1, 2), (3, 1), (2, 3)):
        answers = sessions.pool.run(
            session, "send_recv", src=src, dst=dst, seed=7, shape=(1001,), dtype="float16"
        )
        received = [(rank, a) for rank, a in enumerate(answers) if a is not None]
        assert [rank for rank, _ in received] == [dst]
        assert received[0][1]["err_ratio"] == 0.0, f"{src} -> {dst}: bytes changed on the way"


@pytest.mark.parametrize("num_nodes", (2, 3, 6))
def test_reduce_delivers_the_sum_to_the_hub_only(sessions: Sessions, num_nodes: int) -> None:
    session = sessions.get(num_nodes)
    for dtype in HALF_AND_FULL:
        answers = sessions.pool.run(session, "reduce", dst=0, seed=11, shape=(7, 143), dtype=dtype)
        assert all(a is None for a in answers[1:])
        check_sum(answers[:1], (7, 143), dtype, f"reduce {num_nodes} nodes {dtype}")


@pytest.mark.parametrize(("algorithm", "num_nodes"), [("star", 4), ("ring", 3), ("ring", 4)])
def test_injected_link_delay_sets_a_lower_bound(
    sessions: Sessions, algorithm: str, num_nodes: int
) -> None:
    """TPI-LLM's count: star waits 2 link delays, ring 2(N-1). Lower bounds only."""
    delay_ms = 10.0
    session = sessions.get(num_nodes, algorithm, delay_ms)
    hops = 2 if algorithm == "star" else 2 * (num_nodes - 1)
    for seed in range(2):
        answers = sessions.pool.run(session, "all_reduce", seed=seed, shape=(576,), dtype="float32")
        check_sum(answers, (576,), "float32", f"{algorithm} with delay")
        slowest_s = max(a["elapsed_s"] for a in answers)
        assert slowest_s >= hops * delay_ms / 1e3 * 0.999, f"{slowest_s * 1e3:.2f} ms"
