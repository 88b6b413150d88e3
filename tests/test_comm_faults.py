"""A rank process that dies mid-session: every other rank raises PeerLostError naming it.

Real processes on 127.0.0.1; the victim calls os._exit, so only the kernel closing
its sockets tells the others. The harness waits with a timeout, so a hang fails the
test instead of stalling the suite.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.comm_worker import RankPool, WorkerError

ANSWER_TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def pool() -> Iterator[RankPool]:
    pool = RankPool(9, timeout_s=ANSWER_TIMEOUT_S)
    try:
        yield pool
    finally:
        pool.close()


@pytest.mark.parametrize(
    ("algorithm", "members", "victim_rank"),
    [("star", [0, 1, 2], 2), ("star", [3, 4, 5], 0), ("ring", [6, 7, 8], 1)],
    ids=["star-agent-lost", "star-hub-lost", "ring-rank-lost"],
)
def test_lost_peer_is_named_by_every_other_rank(
    pool: RankPool, algorithm: str, members: list[int], victim_rank: int
) -> None:
    session = pool.open_session(members, algorithm)
    args = {"op": "all_reduce", "session": session, "shape": (576,), "dtype": "float32"}
    pool.call(members, {**args, "seed": 1})  # the session works

    pool.exit_worker(members[victim_rank], session)
    survivors = [m for i, m in enumerate(members) if i != victim_rank]
    answers = pool.call_each(survivors, {**args, "seed": 2})

    for worker, answer in zip(survivors, answers, strict=True):
        assert isinstance(answer, WorkerError), f"worker {worker} finished a broken all-reduce"
        assert answer.info["type"] == "PeerLostError", answer.info["traceback"]
        assert answer.info["peer"] == f"rank {victim_rank}", answer.info["message"]
