"""Rank processes for the collective tests: real processes talking over 127.0.0.1.

`RankPool` starts one "spawn" process per worker. Each worker opens a DataListener on
127.0.0.1 and reports its port; the pool then opens sessions over any subset of its
workers (session rank = position in the subset) and runs operations on them. Inputs
are seeded, so each worker computes the local reference (the plain sum, the broadcast
source's tensor) itself and answers with a summary: digest of the result bytes, error
against the reference in units of the allowed tolerance, frames received, elapsed
time. Tensors never cross the test's queues, so 64 MiB cases stay cheap.

The queues between the test and its workers are the harness, not the system under
test; no peer of the data channel ever sees a pickle.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing as mp
import os
import queue
import secrets
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from edgecluster.comm.communicator import Communicator, SessionConfig
from edgecluster.errors import PeerLostError
from edgecluster.net.datachannel import DataListener, Link

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Summary = dict[str, Any]


# ------------------------------------------------------------------ worker side


@dataclass
class _Session:
    comm: Communicator
    tensors: list[int] = field(default_factory=lambda: [0])


def seeded_input(seed: int, rank: int, shape: Sequence[int], dtype: str) -> torch.Tensor:
    """Rank `rank`'s input for case `seed`: the same on every process."""
    gen = torch.Generator().manual_seed(seed * 1009 + rank)
    return torch.randn(tuple(shape), generator=gen).to(DTYPES[dtype])


def _digest(t: torch.Tensor) -> str:
    flat = t.contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()


def _sum_error_ratio(result: torch.Tensor, inputs: list[torch.Tensor]) -> float:
    """max |result - sum| / tolerance: <= 1 passes. fp32 sums, rounded once to the dtype."""
    wide = [x.float() for x in inputs]
    ref = torch.stack(wide).sum(0)
    spread = torch.stack(wide).abs().sum(0)
    eps32 = torch.finfo(torch.float32).eps
    tol = torch.finfo(result.dtype).eps * ref.abs() + len(inputs) * eps32 * spread + 1e-30
    return float(((result.float() - ref).abs() / tol).max()) if ref.numel() else 0.0


def _summary(result: torch.Tensor, expected_dtype: str, ratio: float, elapsed: float) -> Summary:
    return {
        "digest": _digest(result),
        "shape": tuple(result.shape),
        "dtype": str(result.dtype).removeprefix("torch."),
        "expected_dtype": expected_dtype,
        "err_ratio": ratio,
        "elapsed_s": elapsed,
    }


def _count_tensors(link: Link, counter: list[int]) -> None:
    """Counts the tensors `link` receives (instance attribute shadows the method that
    every receive goes through; keepalives are not tensors)."""
    inner = link.recv_tensor_or_keepalive

    def counted() -> Any:
        tensor = inner()
        counter[0] += tensor is not None
        return tensor

    link.recv_tensor_or_keepalive = counted  # type: ignore[method-assign]


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.listener = DataListener("127.0.0.1")
        self.sessions: dict[str, _Session] = {}

    def expect(self, cmd: dict[str, Any]) -> None:
        self.listener.expect(cmd["session"], cmd["key"], cmd["delay_ms"])

    def connect(self, cmd: dict[str, Any]) -> None:
        config = SessionConfig(
            session_id=cmd["session"],
            session_key=cmd["key"],
            rank=cmd["members"].index(self.index),
            endpoints=tuple(cmd["endpoints"]),
            algorithm=cmd["algorithm"],
            link_delay_ms=cmd["delay_ms"],
        )
        session = _Session(Communicator.connect(config, self.listener))
        for peer in range(config.world_size):
            if peer != config.rank:
                _count_tensors(session.comm.link(peer), session.tensors)
        self.sessions[cmd["session"]] = session

    def run(self, cmd: dict[str, Any]) -> Summary | None:
        session = self.sessions[cmd["session"]]
        session.tensors[0] = 0
        out = _OPS[cmd["op"]](session.comm, cmd)
        if out is not None:
            out["tensors"] = session.tensors[0]
        return out

    def close(self, cmd: dict[str, Any]) -> None:
        self.sessions.pop(cmd["session"]).comm.close()
        self.listener.forget(cmd["session"])


def _op_all_reduce(comm: Communicator, cmd: dict[str, Any]) -> Summary | None:
    n, shape, dtype, seed = comm.world_size, cmd["shape"], cmd["dtype"], cmd["seed"]
    group = cmd.get("ranks") or list(range(n))  # the group reducing; others sit out
    if comm.rank not in group:
        return None
    mine = seeded_input(seed, comm.rank, shape, dtype)
    # stagger_ms: the last rank contributes first, rank 1 last (reverse arrival order)
    time.sleep((n - 1 - comm.rank) * cmd.get("stagger_ms", 0.0) / 1e3)
    start = time.monotonic()
    result = comm.all_reduce(mine, cmd.get("ranks"))
    elapsed = time.monotonic() - start
    inputs = [seeded_input(seed, r, shape, dtype) for r in group]
    out = _summary(result, dtype, _sum_error_ratio(result, inputs), elapsed)
    rank_order = inputs[0].float()
    for x in inputs[1:]:
        rank_order = rank_order + x.float()
    out["rank_order_exact"] = torch.equal(result, rank_order.to(result.dtype))
    return out


def _op_reduce(comm: Communicator, cmd: dict[str, Any]) -> Summary | None:
    n, shape, dtype, seed = comm.world_size, cmd["shape"], cmd["dtype"], cmd["seed"]
    result = comm.reduce(seeded_input(seed, comm.rank, shape, dtype), dst=cmd["dst"])
    if result is None:
        return None
    inputs = [seeded_input(seed, r, shape, dtype) for r in range(n)]
    return _summary(result, dtype, _sum_error_ratio(result, inputs), 0.0)


def _exact(result: torch.Tensor, expected: torch.Tensor, dtype: str) -> Summary:
    same = result.dtype == expected.dtype and torch.equal(result, expected)
    return _summary(result, dtype, 0.0 if same else math.inf, 0.0)


def _op_broadcast(comm: Communicator, cmd: dict[str, Any]) -> Summary:
    src, shape, dtype, seed = cmd["src"], cmd["shape"], cmd["dtype"], cmd["seed"]
    expected = seeded_input(seed, src, shape, dtype)
    result = comm.broadcast(expected if comm.rank == src else None, src=src)
    return _exact(result, expected, dtype)


def _op_send_recv(comm: Communicator, cmd: dict[str, Any]) -> Summary | None:
    src, dst, shape, dtype, seed = cmd["src"], cmd["dst"], cmd["shape"], cmd["dtype"], cmd["seed"]
    expected = seeded_input(seed, src, shape, dtype)
    if comm.rank == src:
        comm.send(expected, dst)
        return None
    if comm.rank == dst:
        return _exact(comm.recv(src), expected, dtype)
    return None


def _op_exit(comm: Communicator, cmd: dict[str, Any]) -> None:
    os._exit(0)  # a lost peer: the kernel closes its sockets, nothing says goodbye


_OPS: dict[str, Callable[[Communicator, dict[str, Any]], Summary | None]] = {
    "all_reduce": _op_all_reduce,
    "reduce": _op_reduce,
    "broadcast": _op_broadcast,
    "send_recv": _op_send_recv,
    "exit": _op_exit,
}


def _describe(exc: BaseException) -> dict[str, str]:
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "peer": exc.peer if isinstance(exc, PeerLostError) else "",
        "traceback": traceback.format_exc(),
    }


def worker_main(index: int, inbox: Any, outbox: Any) -> None:
    """Entry point of a worker process: answers each command with ("ok"|"error", value)."""
    torch.set_num_threads(1)
    worker = _Worker(index)
    outbox.put(("ok", worker.listener.port))
    handlers = {"expect": worker.expect, "connect": worker.connect, "close": worker.close}
    while (cmd := inbox.get()) is not None:
        try:
            outbox.put(("ok", handlers.get(cmd["op"], worker.run)(cmd)))
        except Exception as exc:  # the test decides what an error means
            outbox.put(("error", _describe(exc)))
    worker.listener.close()


# ------------------------------------------------------------------ test side


class WorkerError(AssertionError):
    """A worker answered a command with an exception."""

    def __init__(self, index: int, info: dict[str, str]) -> None:
        super().__init__(f"worker {index}: {info['type']}: {info['message']}\n{info['traceback']}")
        self.info = info


class RankPool:
    """`num_workers` rank processes on 127.0.0.1, each with its own command queue."""

    def __init__(
        self, num_workers: int, timeout_s: float = 60.0, startup_timeout_s: float = 180.0
    ) -> None:
        ctx = mp.get_context("spawn")
        self.timeout_s = timeout_s
        self._inboxes = [ctx.Queue() for _ in range(num_workers)]
        self._outboxes = [ctx.Queue() for _ in range(num_workers)]
        self._procs = [
            ctx.Process(target=worker_main, args=(i, self._inboxes[i], self._outboxes[i]))
            for i in range(num_workers)
        ]
        for proc in self._procs:
            proc.daemon = True
            proc.start()
        self.ports = [self._answer(i, startup_timeout_s) for i in range(num_workers)]
        self._sessions: dict[str, list[int]] = {}

    def _answer(self, index: int, timeout_s: float | None = None) -> Any:
        try:
            status, value = self._outboxes[index].get(timeout=timeout_s or self.timeout_s)
        except queue.Empty:
            raise TimeoutError(f"worker {index} did not answer (hung?)") from None
        if status == "error":
            raise WorkerError(index, value)
        return value

    def call(self, members: Sequence[int], cmd: dict[str, Any]) -> list[Any]:
        """Sends `cmd` to every member at once, then collects each answer in order."""
        for index in members:
            self._inboxes[index].put(cmd)
        return [self._answer(index) for index in members]

    def call_each(self, members: Sequence[int], cmd: dict[str, Any]) -> list[Any]:
        """Like `call`, but returns each answer or WorkerError instead of raising."""
        for index in members:
            self._inboxes[index].put(cmd)
        out: list[Any] = []
        for index in members:
            try:
                out.append(self._answer(index))
            except WorkerError as exc:
                out.append(exc)
        return out

    def open_session(
        self, members: Sequence[int], algorithm: str = "star", delay_ms: float = 0.0
    ) -> str:
        """A session over `members` (rank i = members[i]); returns its id."""
        session = f"s-{secrets.token_hex(4)}"
        cmd = {
            "session": session,
            "key": secrets.token_bytes(32),
            "members": list(members),
            "endpoints": [f"127.0.0.1:{self.ports[i]}" for i in members],
            "algorithm": algorithm,
            "delay_ms": delay_ms,
        }
        self.call(members, {**cmd, "op": "expect"})
        self.call(members, {**cmd, "op": "connect"})
        self._sessions[session] = list(members)
        return session

    def run(self, session: str, op: str, **args: Any) -> list[Any]:
        """Runs `op` on every rank of `session`; answers in rank order."""
        return self.call(self._sessions[session], {"op": op, "session": session, **args})

    def members(self, session: str) -> list[int]:
        return list(self._sessions[session])

    def exit_worker(self, index: int, session: str) -> None:
        """Makes worker `index` exit abruptly mid-session, and waits until it is gone."""
        self._inboxes[index].put({"op": "exit", "session": session})
        self._procs[index].join(timeout=self.timeout_s)
        assert not self._procs[index].is_alive(), f"worker {index} did not exit"

    def close(self) -> None:
        for index, proc in enumerate(self._procs):
            if proc.is_alive():
                self._inboxes[index].put(None)
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
