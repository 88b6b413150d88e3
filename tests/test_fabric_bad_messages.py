"""Bad messages over gRPC to a running agent and coordinator: refused with a reason, and
the receiver keeps serving (answers Status, keeps heartbeating)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import torch

from edgecluster import PROTOCOL_VERSION
from edgecluster.net.codec import CHUNK_BYTES, encode_chunks
from edgecluster.net.convert import profile_to_pb
from edgecluster.net.grpc_util import MAX_MESSAGE_BYTES, open_channel
from edgecluster.net.pb import edgecluster_pb2 as pb
from edgecluster.net.pb import edgecluster_pb2_grpc as pb_grpc
from edgecluster.types import DeviceProfile
from edgecluster.weights.slicing import tensor_digest
from tests.procs import (
    Coordinator,
    Proc,
    ProcessPool,
    module_procs,  # noqa: F401  (fixture)
    unique_name,
)

SHARD = "bad-messages-test"


@dataclass(frozen=True)
class Cluster:
    coord: Coordinator
    agent: Proc
    name: str  # the agent's
    address: str  # the agent's gRPC server


@pytest.fixture(scope="module")
def cluster(module_procs: ProcessPool) -> Cluster:  # noqa: F811
    """A coordinator and one agent, alive."""
    coord = module_procs.coordinator()
    name = unique_name("target")
    agent = module_procs.agent(coord.grpc_address, name=name)
    member = coord.wait_member(name, "alive", timeout_s=20)
    return Cluster(coord=coord, agent=agent, name=name, address=member["address"])


@pytest.fixture(scope="module")
def stub(cluster: Cluster) -> Iterator[pb_grpc.AgentStub]:
    with open_channel(cluster.address, cluster.coord.token) as channel:
        yield pb_grpc.AgentStub(channel)


def _tensor(dtype: str, shape: list[int], data: bytes, offset: int = 0) -> pb.ShardChunk:
    chunk = pb.TensorChunk(name="w", dtype=dtype, shape=shape, offset=offset, data=data)
    return pb.ShardChunk(shard_key=SHARD, block="layers.0.mlp", chunk=chunk)


def _chunks_of(tensors: dict[str, torch.Tensor]) -> list[pb.ShardChunk]:
    return [
        pb.ShardChunk(shard_key=SHARD, block="layers.0.mlp", chunk=c)
        for name, t in tensors.items()
        for c in encode_chunks(t, name)
    ]


def _end(tensors: dict[str, torch.Tensor] | None = None) -> pb.ShardChunk:
    digest = tensor_digest(tensors or {})
    return pb.ShardChunk(shard_key=SHARD, block="layers.0.mlp", block_end=True, block_sha256=digest)


BAD_STREAMS: dict[str, tuple[list[pb.ShardChunk], str]] = {
    "too-few-bytes": (
        [_tensor("float32", [2, 3], bytes(23)), _end()],
        r"tensor 'w' float32 \[2, 3\] has 23 of its 24 bytes",
    ),
    "too-few-bytes-at-stream-end": (
        [_tensor("float32", [2, 3], bytes(23))],
        r"tensor 'w' float32 \[2, 3\] has 23 of its 24 bytes",
    ),
    "too-many-bytes": (
        [_tensor("float32", [2, 3], bytes(25)), _end()],
        r"bytes \[0, 25\) fall outside the 24 bytes that float32 \[2, 3\] holds",
    ),
    "unknown-dtype": (
        [_tensor("complex64", [3], bytes(24)), _end()],
        r"unknown dtype 'complex64'",
    ),
    "missing-dtype": ([_tensor("", [3], bytes(12)), _end()], r"unknown dtype ''"),
    "nine-dims": (
        [_tensor("float32", [1] * 9, bytes(4)), _end()],
        r"9 dims exceeds the limit 8",
    ),
    "2**40-elements": (
        [_tensor("uint8", [1 << 20, 1 << 20], bytes(16)), _end()],
        r"has 1099511627776 elements, over the limit",
    ),
    "over-the-byte-limit": (
        [_tensor("int64", [1 << 30], bytes(16)), _end()],
        r"8589934592 bytes exceeds the size limit",
    ),
    "chunk-over-1-MiB": (
        [_tensor("float32", [1 << 20], bytes(CHUNK_BYTES + 4)), _end()],
        r"a chunk of 1048580 bytes exceeds the chunk limit 1048576",
    ),
    "out-of-order-chunks": (
        [_tensor("uint8", [16], bytes(8)), _tensor("uint8", [16], bytes(4), offset=12)],
        r"chunk at byte 12, expected 8",
    ),
    "no-block-end": (_chunks_of({"w": torch.ones(4)}), r"no block_end"),
    "path-in-block-name": (
        [
            pb.ShardChunk(
                shard_key=SHARD, block="../../evil", block_end=True, block_sha256=tensor_digest({})
            )
        ],
        r"block name '../../evil' is not a safe file name",
    ),
    "wrong-block-digest": (
        [*_chunks_of({"w": torch.ones(4)}), _end({"w": torch.zeros(4)})],
        r"does not match its checksum",
    ),
}


def _still_serving(cluster: Cluster, stub: pb_grpc.AgentStub) -> None:
    assert cluster.agent.running(), cluster.agent.describe()
    assert stub.Status(pb.Empty(), timeout=5).node_id
    member = cluster.coord.member(cluster.name)
    assert member is not None and member["state"] == "alive", member
    assert member["last_seen_s_ago"] < 2.4, member  # heartbeats still arrive (every 0.5 s)


@pytest.mark.parametrize("case", sorted(BAD_STREAMS))
def test_bad_tensor_messages_get_invalid_argument_and_the_agent_keeps_serving(
    cluster: Cluster, stub: pb_grpc.AgentStub, case: str
) -> None:
    messages, reason = BAD_STREAMS[case]
    with pytest.raises(grpc.RpcError) as err:
        stub.PutShard(iter(messages), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert re.search(reason, err.value.details()), err.value.details()
    _still_serving(cluster, stub)


def test_a_message_over_the_grpc_limit_is_refused_before_the_agent_reads_it(
    cluster: Cluster, stub: pb_grpc.AgentStub
) -> None:
    huge = _tensor("uint8", [MAX_MESSAGE_BYTES + 1], bytes(MAX_MESSAGE_BYTES + 1))
    with pytest.raises(grpc.RpcError) as err:
        stub.PutShard(iter([huge, _end()]), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
    _still_serving(cluster, stub)


def test_a_good_shard_is_still_accepted_after_bad_ones(
    cluster: Cluster, stub: pb_grpc.AgentStub
) -> None:
    tensors = {"w": torch.arange(3 * CHUNK_BYTES // 4, dtype=torch.float32), "b": torch.ones(3)}
    messages = _chunks_of(tensors)
    assert len(messages) > 3  # the big tensor travels in several chunks
    reply = stub.PutShard(iter([*messages, _end(tensors)]), timeout=30)
    assert reply.blocks_stored == 1
    assert reply.bytes_received == sum(t.numel() * t.element_size() for t in tensors.values())
    _still_serving(cluster, stub)


def _call_without_token(address: str) -> Any:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.AgentStub(channel).Status(pb.Empty(), timeout=5)


def _call_with_wrong_token(address: str) -> Any:
    with open_channel(address, "not-the-token") as channel:
        return pb_grpc.AgentStub(channel).Status(pb.Empty(), timeout=5)


def _stream_with_wrong_token(address: str) -> Any:
    with open_channel(address, "not-the-token") as channel:
        return pb_grpc.AgentStub(channel).PutShard(iter([_end()]), timeout=5)


@pytest.mark.parametrize(
    "call", [_call_without_token, _call_with_wrong_token, _stream_with_wrong_token]
)
def test_calls_without_the_right_token_are_unauthenticated(
    cluster: Cluster, stub: pb_grpc.AgentStub, call: Any
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call(cluster.address)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authentication failed" in err.value.details()
    _still_serving(cluster, stub)


@pytest.mark.parametrize("version", [0, PROTOCOL_VERSION + 1])
def test_a_join_with_another_protocol_version_is_refused_naming_both(
    cluster: Cluster, version: int
) -> None:
    coord = cluster.coord
    profile = DeviceProfile(
        cpu_count=1,
        memory_total_bytes=1 << 30,
        memory_available_bytes=1 << 29,
        disk_free_bytes=1 << 30,
        disk_read_bytes_per_s=1e8,
        matmul_gflops=1.0,
    )
    name = unique_name("old-agent")
    request = pb.JoinRequest(
        protocol_version=version,
        node_id="f" * 32,
        name=name,
        address="127.0.0.1:1",
        profile=profile_to_pb(profile),
    )
    with (
        open_channel(coord.grpc_address, coord.token) as channel,
        pytest.raises(grpc.RpcError) as err,
    ):
        pb_grpc.CoordinatorStub(channel).Join(request, timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = err.value.details()
    assert f"agent speaks {version}" in details, details
    assert f"coordinator speaks {PROTOCOL_VERSION}" in details, details
    assert coord.member(name) is None
