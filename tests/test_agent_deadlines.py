"""An agent that joins, heartbeats, and never answers PutShard: the coordinator names
it, drops it within its deadline and serves on the real agents.

The fake agent is built from the library (start_server, the Agent servicer, the real
Join RPC), so it speaks to the coordinator exactly as `edge-agent` does; only its
PutShard hangs. Two real agents join next to it; `--min-agents 3` makes the first
plan include the fake.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from edgecluster import PROTOCOL_VERSION
from edgecluster.net.grpc_util import open_channel, start_server
from edgecluster.net.pb import edgecluster_pb2 as pb
from edgecluster.net.pb import edgecluster_pb2_grpc as pb_grpc
from tests.procs import Coordinator, ProcessPool, free_port, procs, wait_until  # noqa: F401
from tests.tiny_llama import make_tiny_llama

pytestmark = pytest.mark.slow
HUNG = "hung-agent"


class HungAgent(pb_grpc.AgentServicer):
    """Says it lacks every block, then holds every PutShard until released."""

    def __init__(self, release: threading.Event) -> None:
        self.release = release
        self.put_calls: list[float] = []

    def PrepareShard(self, request: pb.PrepareShardRequest, context: Any) -> pb.PrepareShardReply:
        return pb.PrepareShardReply(missing_blocks=list(request.blocks))

    def PutShard(self, request_iterator: Iterator[pb.ShardChunk], context: Any) -> pb.PutShardReply:
        self.put_calls.append(time.monotonic())
        self.release.wait(120)
        context.abort(grpc.StatusCode.UNAVAILABLE, "test over")
        raise AssertionError("unreachable")


def _join_and_heartbeat(coord: Coordinator, port: int, stop: threading.Event) -> threading.Thread:
    node_id = uuid.uuid4().hex
    profile = pb.DeviceProfile(
        cpu_count=2, memory_total_bytes=8 << 30, memory_available_bytes=8 << 30,
        disk_free_bytes=20 << 30, disk_read_bytes_per_s=500e6, matmul_gflops=50.0,
        accelerator="none", runtime_rss_bytes=300 << 20,
    )  # fmt: skip
    channel = open_channel(coord.grpc_address, coord.token)
    stub = pb_grpc.CoordinatorStub(channel)
    stub.Join(
        pb.JoinRequest(
            protocol_version=PROTOCOL_VERSION, node_id=node_id, name=HUNG,
            address=f"127.0.0.1:{port}", profile=profile, data_port=free_port(),
        ),
        timeout=5,
    )  # fmt: skip

    def beat() -> None:  # alive as far as heartbeats go: only its PutShard hangs
        while not stop.wait(0.5):
            with contextlib.suppress(grpc.RpcError):
                stub.Heartbeat(pb.HeartbeatRequest(node_id=node_id), timeout=2)
        channel.close()

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    return thread


def _health(coord: Coordinator) -> int:
    try:
        with urllib.request.urlopen(coord.url + "/health", timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except OSError:
        return 0


def test_an_agent_that_never_answers_put_shard_is_dropped_within_its_deadline(
    procs: ProcessPool,  # noqa: F811
) -> None:
    model = make_tiny_llama(procs.root / "tiny-model", max_positions=256)
    coord = procs.coordinator("--model", str(model), "--min-agents", "3")
    release, stop = threading.Event(), threading.Event()
    fake = HungAgent(release)
    server, port = start_server(
        host="127.0.0.1",
        port=0,
        token=coord.token,
        register=[lambda s: pb_grpc.add_AgentServicer_to_server(fake, s)],
    )
    try:
        beat = _join_and_heartbeat(coord, port, stop)
        real = [procs.agent(coord.grpc_address, name=f"real-{i}") for i in range(2)]
        wait_until(lambda: fake.put_calls, 90, "the coordinator to send the fake its shard")
        hung_at = fake.put_calls[0]
        try:
            wait_until(lambda: _health(coord) == 200, 90, "serving without the hung agent", 0.2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{coord.describe()}") from None
        # PutShard of one tiny block has a 10 s deadline; the rest is margin for a busy box.
        assert time.monotonic() - hung_at < 60
        log = coord.stderr()
        assert f"dropping agent {HUNG}" in log and "PutShard" in log, coord.describe()
        assert coord.member(HUNG)["state"] == "dead"  # type: ignore[index]

        model_id = coord.get_json("/v1/models")["data"][0]["id"]
        body = {"model": model_id, "prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0}
        req = urllib.request.Request(
            coord.url + "/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200
        serving = {a["name"] for a in coord.cluster()["agents"] if a.get("shard")}  # type: ignore[index]
        assert serving == {"real-0", "real-1"}
        assert all(p.running() for p in real)
    finally:
        release.set()
        stop.set()
        server.stop(grace=0)
    beat.join(timeout=5)
