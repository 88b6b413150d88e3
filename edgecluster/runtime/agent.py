"""An agent: profile the device, serve the Agent service, join a coordinator, heartbeat.

Exit codes: 0 after an orderly leave (SIGTERM/SIGINT), 2 when the coordinator
refused our token or protocol version.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from pathlib import Path

import grpc
import psutil
import torch

from edgecluster import PROTOCOL_VERSION
from edgecluster.config import AgentConfig
from edgecluster.device.allocator import fast_allocator, tame_allocator
from edgecluster.device.profile import default_threads, profile_device
from edgecluster.errors import AuthenticationError, ProtocolMismatchError
from edgecluster.net.convert import profile_to_pb, runtime_to_pb
from edgecluster.net.datachannel import DataListener
from edgecluster.net.discovery import Announcement, Discovery
from edgecluster.net.grpc_util import open_channel, start_server
from edgecluster.net.pb import edgecluster_pb2 as pb
from edgecluster.net.pb import edgecluster_pb2_grpc as pb_grpc
from edgecluster.runtime.agent_service import AgentService
from edgecluster.runtime.agent_session import AgentSessions, MemoryPolicy
from edgecluster.runtime.data_dir_lock import lock_data_dir
from edgecluster.types import DeviceProfile
from edgecluster.weights.shard_store import ShardStore

log = logging.getLogger(__name__)


def load_node_id(data_dir: Path) -> str:
    """This device's id, kept in its data dir so a restart rejoins as the same node."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "node_id"
    if path.exists():
        return path.read_text().strip()
    node_id = uuid.uuid4().hex
    path.write_text(node_id + "\n")
    return node_id


def reachable_host(bind_host: str, coordinator: str) -> str:
    """The address the coordinator can reach us at (our side of the route to it)."""
    if bind_host not in ("0.0.0.0", "", "::"):
        return bind_host
    host = coordinator.rpartition(":")[0].strip("[]")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((socket.gethostbyname(host), 9))  # UDP connect sends nothing
        return str(probe.getsockname()[0])


class AgentNode:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        if config.memory_limit_bytes:
            tame_allocator()  # freed buffers go back to the kernel: the limit is a promise
        else:
            fast_allocator()
        torch.set_num_threads(config.threads or default_threads())
        lock_data_dir(config.data_dir)  # held until exit (the CLI took it already)
        self.node_id = load_node_id(config.data_dir)
        self.profile: DeviceProfile = profile_device(config.data_dir, config.memory_limit_bytes)
        self.store = ShardStore(config.data_dir, cache_limit_bytes=config.cache_limit_bytes)
        self.listener = DataListener(config.host, config.data_port)
        self.sessions = AgentSessions(
            store=self.store,
            listener=self.listener,
            node_name=config.name,
            memory=MemoryPolicy(
                limit_bytes=config.memory_limit_bytes,
                window_override=config.window_blocks,
                read_bytes_per_s=self.profile.disk_read_bytes_per_s,
                matmul_gflops=self.profile.matmul_gflops,
            ),
        )
        self._coordinator: str | None = config.coordinator
        self._wake = threading.Event()
        self._found_over_mdns: set[str] = set()
        self._refused: set[str] = set()  # coordinators of other clusters seen over mDNS
        self._fatal: Exception | None = None
        service = AgentService(
            store=self.store,
            on_invite=self._invited,
            sessions=self.sessions,
            status=self.status,
        )
        self.server, self.port = start_server(
            host=config.host,
            port=config.port,
            token=config.token,
            tls=config.tls,
            register=[lambda s: pb_grpc.add_AgentServicer_to_server(service, s)],
        )
        self.discovery = Discovery(config.host) if config.mdns else None

    # ---- coordinator discovery ----
    def _invited(self, address: str) -> None:
        if self._coordinator != address:
            log.info("invited by the coordinator at %s", address)
            self._coordinator = address
        self._wake.set()

    def _found(self, ann: Announcement) -> None:
        if ann.address in self._refused:
            return
        if self.config.coordinator is None and self._coordinator is None:
            self._found_over_mdns.add(ann.address)
            self._invited(ann.address)

    def status(self) -> pb.AgentStatus:
        return runtime_to_pb(self.sessions.runtime(), self.node_id)

    # ---- membership ----
    def _join(self, stub: pb_grpc.CoordinatorStub) -> float:
        host = reachable_host(self.config.host, self._coordinator or "")
        reply = stub.Join(
            pb.JoinRequest(
                protocol_version=PROTOCOL_VERSION,
                node_id=self.node_id,
                name=self.config.name,
                address=f"{host}:{self.port}",
                profile=profile_to_pb(self.profile),
                data_port=self.listener.port,
            ),
            timeout=5,
        )
        log.info("joined the coordinator at %s as %s", self._coordinator, self.node_id[:8])
        return reply.heartbeat_interval_s or self.config.heartbeat_interval_s

    def run(self, stop: threading.Event) -> int:
        if self.discovery is not None:
            self.discovery.advertise(
                role="agent", name=self.config.name, node_id=self.node_id, port=self.port
            )
            self.discovery.watch("coordinator", self._found)
        log.info(
            "agent %s serving on %s:%d (data %d)",
            self.config.name,
            self.config.host,
            self.port,
            self.listener.port,
        )
        try:
            self._membership_loop(stop)
        except (AuthenticationError, ProtocolMismatchError) as exc:
            log.error("%s", exc)
            return 2
        finally:
            self.shutdown()
        return 0

    def _membership_loop(self, stop: threading.Event) -> None:
        waiting_logged = False
        while not stop.is_set():
            address = self._coordinator
            if address is None:
                if not waiting_logged:
                    how = "over mDNS and " if self.discovery is not None else ""
                    log.info("waiting for a coordinator (%sinvitations)", how)
                    waiting_logged = True
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            channel = open_channel(address, self.config.token, self.config.tls)
            try:
                self._stay_joined(pb_grpc.CoordinatorStub(channel), stop, address)
            except AuthenticationError as exc:
                if address not in self._found_over_mdns:
                    raise
                # another cluster's coordinator on the same LAN: keep looking for ours
                log.error("%s; looking for another coordinator", exc)
                self._refused.add(address)
                self._coordinator, waiting_logged = None, False
            finally:
                channel.close()

    def _stay_joined(self, stub: pb_grpc.CoordinatorStub, stop: threading.Event, addr: str) -> None:
        joined_interval: float | None = None
        while not stop.is_set() and self._coordinator == addr:
            try:
                if joined_interval is None:
                    joined_interval = self._join(stub)
                reply = stub.Heartbeat(
                    pb.HeartbeatRequest(
                        node_id=self.node_id,
                        memory_available_bytes=psutil.virtual_memory().available,
                        status=self.status(),
                    ),
                    timeout=2,
                )
                if not reply.known:
                    joined_interval = None
                    continue
            except grpc.RpcError as exc:
                _raise_if_refused(exc, addr)
                log.debug("coordinator %s unreachable: %s", addr, exc.code())
                joined_interval = None
            stop.wait(joined_interval or 1.0)
        if stop.is_set() and joined_interval is not None:
            self._leave(stub)

    def _leave(self, stub: pb_grpc.CoordinatorStub) -> None:
        try:
            stub.Leave(pb.LeaveRequest(node_id=self.node_id), timeout=2)
            log.info("left the cluster")
        except grpc.RpcError as exc:
            log.warning("could not say goodbye to the coordinator: %s", exc.code())

    def shutdown(self) -> None:
        self.sessions.close(None)
        if self.discovery is not None:
            self.discovery.close()
        self.server.stop(grace=0.5)
        self.listener.close()


def _raise_if_refused(exc: grpc.RpcError, address: str) -> None:
    code = exc.code()  # type: ignore[attr-defined]
    if code == grpc.StatusCode.UNAUTHENTICATED:
        raise AuthenticationError(
            f"authentication failed: the coordinator at {address} refused our cluster token; "
            "pass the token it printed with --token or EDGE_TOKEN"
        )
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        raise ProtocolMismatchError(exc.details())  # type: ignore[attr-defined]


def run_agent(config: AgentConfig, stop: threading.Event | None = None) -> int:
    stop = stop or threading.Event()
    started = time.monotonic()
    node = AgentNode(config)
    log.info("agent ready in %.2f s", time.monotonic() - started)
    return node.run(stop)
