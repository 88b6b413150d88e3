"""Coordinator-to-agent calls: every one has a deadline, and agents are called in parallel.

A deadline is a fixed allowance plus the payload at a floor speed, so a large shard
on a slow link still fits while a hung agent is found within seconds. `call_all`
calls every agent at once and waits for all of them: one slow or dead agent costs a
re-plan its own deadline, never the sum of everyone's. What failed comes back as one
AgentCallsFailed listing every agent, the call and the gRPC status, so the caller
can drop the agents that missed their deadline or are unreachable.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc

from edgecluster.net.pb import edgecluster_pb2 as pb
from edgecluster.net.pb import edgecluster_pb2_grpc as pb_grpc

T = TypeVar("T")

CONTROL_DEADLINE_S = 5.0  # CloseSession, Status: no payload


def put_deadline_s(block_bytes: int) -> float:
    """One PutShard call carries one block: 10 s plus the block at 5 MB/s."""
    return 10.0 + block_bytes / 5e6


def prepare_deadline_s(shard_bytes: int) -> float:
    """PrepareShard hashes the cached blocks: 10 s plus the shard at 50 MB/s."""
    return 10.0 + shard_bytes / 50e6


def open_deadline_s(shard_bytes: int) -> float:
    """OpenSession loads the shard from disk: 20 s plus the shard at 50 MB/s."""
    return 20.0 + shard_bytes / 50e6


class AgentCallError(Exception):
    """One call to one agent failed (its status says whether it missed its deadline)."""

    def __init__(self, name: str, node_id: str, call: str, exc: grpc.RpcError) -> None:
        self.name, self.node_id, self.call = name, node_id, call
        self.code: grpc.StatusCode | None = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        code = self.code.name if self.code is not None else "?"
        super().__init__(f"{call} to agent {name} failed: {code}: {details}")

    @property
    def missed_deadline(self) -> bool:
        return self.code == grpc.StatusCode.DEADLINE_EXCEEDED

    @property
    def unresponsive(self) -> bool:
        """It missed its deadline or cannot be reached: drop it from the plan."""
        return self.code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)


class AgentCallsFailed(Exception):
    def __init__(self, failures: list[AgentCallError]) -> None:
        super().__init__("; ".join(str(f) for f in failures))
        self.failures = failures


def call_all(
    calls: Mapping[str, Callable[[], T]], names: Mapping[str, str], call: str
) -> dict[str, T]:
    """Runs `calls` (node id -> one agent's call) in parallel; every result, or
    AgentCallsFailed naming every agent whose call raised grpc.RpcError."""
    if not calls:
        return {}
    with ThreadPoolExecutor(max_workers=len(calls), thread_name_prefix=call) as pool:
        futures = {node_id: pool.submit(fn) for node_id, fn in calls.items()}
        results: dict[str, T] = {}
        failures: list[AgentCallError] = []
        for node_id, future in futures.items():
            try:
                results[node_id] = future.result()
            except AgentCallError as exc:
                failures.append(exc)
            except grpc.RpcError as exc:
                failures.append(AgentCallError(names[node_id], node_id, call, exc))
    if failures:
        raise AgentCallsFailed(failures)
    return results


def close_sessions(stubs: Mapping[str, pb_grpc.AgentStub], session_id: str) -> None:
    """Best effort, in parallel: agents that opened a session that will not run drop it."""
    calls = {
        node_id: (
            lambda stub=stub: stub.CloseSession(
                pb.CloseSessionRequest(session_id=session_id), timeout=CONTROL_DEADLINE_S
            )
        )
        for node_id, stub in stubs.items()
    }
    with contextlib.suppress(AgentCallsFailed):
        call_all(calls, {n: n[:8] for n in stubs}, "CloseSession")
