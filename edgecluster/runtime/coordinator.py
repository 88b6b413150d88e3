"""The coordinator: membership, discovery, local agents, serving, HTTP API.

`run_coordinator` wires the pieces and serves until stopped. With `--model none`
only the control plane runs (membership and the cluster view).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from typing import Any

import grpc
import torch

from edgecluster.config import CoordinatorConfig
from edgecluster.device.allocator import fast_allocator, tame_allocator
from edgecluster.device.profile import effective_cpus
from edgecluster.net.discovery import Announcement, Discovery
from edgecluster.net.grpc_util import TlsFiles, open_channel, start_server
from edgecluster.net.pb import edgecluster_pb2 as pb
from edgecluster.net.pb import edgecluster_pb2_grpc as pb_grpc
from edgecluster.runtime.coordinator_service import CoordinatorService
from edgecluster.runtime.local_agents import LocalAgents
from edgecluster.runtime.membership import Membership

log = logging.getLogger(__name__)


class ControlPlane:
    """The cluster without a model: who is here."""

    def __init__(self, membership: Membership) -> None:
        self._membership = membership

    def state(self) -> str:
        return "control plane only (no model)"

    def cluster_view(self) -> dict[str, Any]:
        return {"model": None, "agents": [m.to_json() for m in self._membership.snapshot()]}


class CoordinatorNode:
    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        self.node_id = uuid.uuid4().hex
        self.membership = Membership(timeout_s=config.heartbeat_timeout_s)
        self._stop = threading.Event()
        self.server, self.grpc_port = start_server(
            host=config.host,
            port=config.grpc_port,
            token=config.token,
            tls=config.tls,
            register=[
                lambda s: pb_grpc.add_CoordinatorServicer_to_server(
                    CoordinatorService(self.membership), s
                )
            ],
        )
        self.membership.run_sweeper(self._stop)
        self.discovery = Discovery(config.host) if config.mdns else None
        self.local = LocalAgents()
        self.serving: Any = None
        self._invited: dict[str, float] = {}

    @property
    def grpc_address(self) -> str:
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "") else self.config.host
        return f"{host}:{self.grpc_port}"

    def start(self) -> None:
        if self.discovery is not None:
            self.discovery.advertise(
                role="coordinator", name="coordinator", node_id=self.node_id, port=self.grpc_port
            )
            self.discovery.watch("agent", self._agent_seen)
        if self.config.peers:
            threading.Thread(target=self._invite_peers, name="peers", daemon=True).start()
        if self.config.local_agents:
            # The hub waits while the agents run the layers, so they get every core.
            threads = max(1, int(effective_cpus()) // self.config.local_agents)
            torch.set_num_threads(1)  # the hub's LM head splits itself across cores
            self.local.start(
                self.config.local_agents,
                coordinator=self.grpc_address,
                token=self.config.token,
                data_root=self.config.cache_dir / "local-agents",
                threads=threads,
                extra_args=_tls_args(self.config.tls),
            )

    def start_serving(self) -> None:
        if self.config.model == "none":
            return
        from edgecluster.runtime.serving import ServingCluster
        from edgecluster.weights.models import resolve_model

        model_dir = resolve_model(self.config.model, self.config.cache_dir)
        self.serving = ServingCluster(self.config, self.membership, model_dir, self.config.model)

    def _agent_seen(self, ann: Announcement) -> None:
        known = {m.id for m in self.membership.alive()}
        if ann.node_id not in known:
            self._invite(ann.address)

    def _invite_peers(self) -> None:
        while not self._stop.wait(1.0):
            alive = {m.address for m in self.membership.alive()}
            for peer in self.config.peers:
                if peer not in alive:
                    self._invite(peer)

    def _invite(self, address: str) -> None:
        now = time.monotonic()
        if now - self._invited.get(address, 0.0) < 2.0:
            return
        self._invited[address] = now
        channel = open_channel(address, self.config.token, self.config.tls)
        try:
            pb_grpc.AgentStub(channel).Invite(
                pb.InviteRequest(coordinator_address=self._address_for(address)), timeout=2
            )
        except grpc.RpcError as exc:
            log.debug("invite to %s failed: %s", address, exc.code())
        finally:
            channel.close()

    def _address_for(self, agent_address: str) -> str:
        from edgecluster.runtime.agent import reachable_host

        return f"{reachable_host(self.config.host, agent_address)}:{self.grpc_port}"

    def stop(self) -> None:
        self._stop.set()
        if self.serving is not None:
            self.serving.close()
        self.local.stop()
        if self.discovery is not None:
            self.discovery.close()
        self.server.stop(grace=0.5)


async def _serve_http(node: CoordinatorNode, stop: threading.Event, training: Any = None) -> None:
    from edgecluster.api.http import ApiOptions, build_app, start_api_server

    cfg = node.config
    options = ApiOptions(
        api_key=cfg.api_key,
        cors_origins=cfg.cors_origins,
        max_body_bytes=cfg.max_body_bytes,
        request_timeout_s=cfg.request_timeout_s,
    )
    app = build_app(
        backend=node.serving, control=ControlPlane(node.membership), options=options,
        training=training,
    )  # fmt: skip
    runner = await start_api_server(app, host=cfg.http_host, port=cfg.http_port)
    log.info(
        "HTTP API on http://%s:%d (%s)",
        cfg.http_host, cfg.http_port, "API key required" if cfg.api_key else "no API key",
    )  # fmt: skip
    try:
        while not stop.is_set():
            await asyncio.sleep(0.2)
    finally:
        await runner.cleanup()


def run_coordinator(config: CoordinatorConfig, stop: threading.Event, on_ready: Any = None) -> int:
    if config.memory_limit_bytes:
        tame_allocator()
    else:
        fast_allocator()
    node = CoordinatorNode(config)
    try:
        node.start()
        node.start_serving()
        if on_ready is not None:
            on_ready(node)
        asyncio.run(_serve_http(node, stop))
    finally:
        node.stop()
    return 0


def _tls_args(tls: TlsFiles) -> list[str]:
    """The coordinator's TLS files, for its --local agents (same certificate and CA)."""
    args: list[str] = []
    for flag, path in (("--tls-cert", tls.cert), ("--tls-key", tls.key), ("--tls-ca", tls.ca)):
        if path is not None:
            args += [flag, str(path)]
    return args
