"""An agent: serve the Agent service, join a coordinator, heartbeat; compute once loaded.

Start-up is ordered so a device is listed at once even on a loaded machine: the
gRPC server starts and the agent joins with a light profile (cores, memory, disk
space) before anything imports torch; then the compute side is built on a thread
(torch, the measured profile, shard store, data listener, sessions) and the agent
joins again with its full profile and data port, which updates its membership.
Shard and session calls that come earlier wait for the compute side.

Exit codes: 0 after an orderly leave (SIGTERM/SIGINT), 1 when the compute side
could not start, 2 when the coordinator refused our token or protocol version.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import psutil

from edgecluster import PROTOCOL_VERSION
from edgecluster.config import AgentConfig
from edgecluster.device.profile import light_profile
from edgecluster.errors import AuthenticationError, ProtocolMismatchError
from edgecluster.net.convert import profile_to_pb, runtime_to_pb
from edgecluster.net.discovery import Announcement, Discovery
from edgecluster.net.grpc_util import open_channel, start_server
from edgecluster.net.pb import edgecluster_pb2 as pb
from edgecluster.net.pb import edgecluster_pb2_grpc as pb_grpc
from edgecluster.runtime.data_dir_lock import lock_data_dir
from edgecluster.types import AgentRuntime, DeviceProfile

if TYPE_CHECKING:
    from edgecluster.runtime.agent_compute import ComputeSide

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


class _StartingAgent(pb_grpc.AgentServicer):
    """The Agent service from the first moment: invitations and status at once, the
    rest forwarded to the real service once the compute side is up (a call that
    comes earlier waits for it, within its deadline)."""

    def __init__(self, node: AgentNode) -> None:
        self._node = node

    def _target(self, context: grpc.ServicerContext) -> Any:
        """The real service, waiting (within the call's deadline) while it starts."""
        remaining = context.time_remaining()
        self._node.compute_ready.wait(min(remaining, 120.0) if remaining else 120.0)
        compute = self._node.compute
        if compute is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the agent is still starting; retry")
            raise AssertionError("unreachable")  # abort raises
        return compute.service

    def Invite(self, request: pb.InviteRequest, context: grpc.ServicerContext) -> pb.Empty:
        if ":" not in request.coordinator_address:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "coordinator_address must be host:port")
        self._node._invited(request.coordinator_address)
        return pb.Empty()

    def Status(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.AgentStatus:
        return self._node.status()

    def PrepareShard(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._target(context).PrepareShard(request, context)

    def PutShard(self, request_iterator: Any, context: grpc.ServicerContext) -> Any:
        return self._target(context).PutShard(request_iterator, context)

    def OpenSession(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._target(context).OpenSession(request, context)

    def CloseSession(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._target(context).CloseSession(request, context)


class AgentNode:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        lock_data_dir(config.data_dir)  # held until exit (the CLI took it already)
        self.node_id = load_node_id(config.data_dir)
        self.profile: DeviceProfile = light_profile(config.data_dir, config.memory_limit_bytes)
        self.compute: ComputeSide | None = None
        self.compute_ready = threading.Event()
        self._profile_version = 0  # bumped when the full profile is in: join again
        self._coordinator: str | None = config.coordinator
        self._wake = threading.Event()
        self._found_over_mdns: set[str] = set()
        self._refused: set[str] = set()  # coordinators of other clusters seen over mDNS
        self._fatal: Exception | None = None
        # Set once the first join was tried (or there is no coordinator to try): torch's
        # import holds the GIL for seconds, so it waits until the join is out.
        self._first_join_tried = threading.Event()
        service = _StartingAgent(self)
        self.server, self.port = start_server(
            host=config.host,
            port=config.port,
            token=config.token,
            tls=config.tls,
            register=[lambda s: pb_grpc.add_AgentServicer_to_server(service, s)],
        )
        self.discovery = Discovery(config.host) if config.mdns else None

    def _start_compute(self, stop: threading.Event) -> None:
        """Heavy start-up, after the first join attempt (10 s at most)."""
        self._first_join_tried.wait(10.0)
        started = time.monotonic()
        try:
            from edgecluster.runtime.agent_compute import start_compute

            compute = start_compute(self.config, self.node_id, self._invited)
        except Exception as exc:  # noqa: BLE001 - reported, and the agent exits
            log.exception("the agent's compute side could not start")
            self._fatal = exc
            self.compute_ready.set()  # calls waiting for it fail now instead
            stop.set()
            return
        self.compute, self.profile = compute, compute.profile
        self._profile_version += 1
        self.compute_ready.set()
        log.info(
            "compute ready in %.2f s (data port %d); sending the full profile",
            time.monotonic() - started,
            compute.listener.port,
        )

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
        if self.compute is None:
            rss = int(psutil.Process().memory_info().rss)
            return runtime_to_pb(AgentRuntime(rss_bytes=rss, peak_rss_bytes=rss), self.node_id)
        return runtime_to_pb(self.compute.sessions.runtime(), self.node_id)

    # ---- membership ----
    def _join(self, stub: pb_grpc.CoordinatorStub) -> float:
        host = reachable_host(self.config.host, self._coordinator or "")
        compute = self.compute
        reply = stub.Join(
            pb.JoinRequest(
                protocol_version=PROTOCOL_VERSION,
                node_id=self.node_id,
                name=self.config.name,
                address=f"{host}:{self.port}",
                profile=profile_to_pb(self.profile),
                data_port=compute.listener.port if compute is not None else 0,
            ),
            timeout=5,
        )
        how = "" if compute is not None else " (light profile; measuring the device)"
        log.info("joined the coordinator at %s as %s%s", self._coordinator, self.node_id[:8], how)
        return reply.heartbeat_interval_s or self.config.heartbeat_interval_s

    def run(self, stop: threading.Event) -> int:
        if self.discovery is not None:
            self.discovery.advertise(
                role="agent", name=self.config.name, node_id=self.node_id, port=self.port
            )
            self.discovery.watch("coordinator", self._found)
        log.info("agent %s serving on %s:%d", self.config.name, self.config.host, self.port)
        threading.Thread(
            target=self._start_compute, args=(stop,), name="compute-start", daemon=True
        ).start()
        try:
            self._membership_loop(stop)
        except (AuthenticationError, ProtocolMismatchError) as exc:
            log.error("%s", exc)
            return 2
        finally:
            self.shutdown()
        return 1 if self._fatal is not None else 0

    def _membership_loop(self, stop: threading.Event) -> None:
        waiting_logged = False
        while not stop.is_set():
            address = self._coordinator
            if address is None:
                if not waiting_logged:
                    how = "over mDNS and " if self.discovery is not None else ""
                    log.info("waiting for a coordinator (%sinvitations)", how)
                    waiting_logged = True
                    self._first_join_tried.set()
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
        joined_version = -1
        while not stop.is_set() and self._coordinator == addr:
            try:
                if joined_interval is None or joined_version != self._profile_version:
                    version = self._profile_version
                    try:
                        joined_interval = self._join(stub)
                    finally:
                        self._first_join_tried.set()
                    joined_version = version
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
            self._pause(stop, joined_interval or 1.0, joined_version)
        if stop.is_set() and joined_interval is not None:
            self._leave(stub)

    def _pause(self, stop: threading.Event, seconds: float, joined_version: int) -> None:
        """Until the next heartbeat, or sooner: stopped, or the full profile is in."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and joined_version == self._profile_version:
            if stop.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
                return

    def _leave(self, stub: pb_grpc.CoordinatorStub) -> None:
        try:
            stub.Leave(pb.LeaveRequest(node_id=self.node_id), timeout=2)
            log.info("left the cluster")
        except grpc.RpcError as exc:
            log.warning("could not say goodbye to the coordinator: %s", exc.code())

    def shutdown(self) -> None:
        if self.compute is not None:
            self.compute.sessions.close(None)
        if self.discovery is not None:
            self.discovery.close()
        self.server.stop(grace=0.5)
        if self.compute is not None:
            self.compute.listener.close()


def _raise_if_refused(exc: grpc.RpcError, address: str) -> None:
    code = exc.code()  # type: ignore[attr-defined]
    if code == grpc.StatusCode.UNAUTHENTICATED:
        details = exc.details() or ""  # type: ignore[attr-defined]
        if "could not prove" in details:  # a fake coordinator, or another cluster's
            raise AuthenticationError(details)
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
    log.info("agent listening in %.2f s", time.monotonic() - started)
    return node.run(stop)
