"""An agent's compute side, built after it has joined: torch, the full device profile,
the shard store, the data listener, serving sessions and the Agent service.

Importing this module imports torch (seconds on a loaded machine); `runtime.agent`
imports it only once the agent is listed, so a new device shows up at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from edgecluster.config import AgentConfig
from edgecluster.device.allocator import fast_allocator, tame_allocator
from edgecluster.device.profile import default_threads, profile_device
from edgecluster.net.convert import runtime_to_pb
from edgecluster.net.datachannel import DataListener
from edgecluster.runtime.agent_service import AgentService
from edgecluster.runtime.agent_session import AgentSessions, MemoryPolicy
from edgecluster.types import DeviceProfile
from edgecluster.weights.shard_store import ShardStore

log = logging.getLogger(__name__)


@dataclass
class ComputeSide:
    profile: DeviceProfile
    store: ShardStore
    listener: DataListener
    sessions: AgentSessions
    service: AgentService

    def close(self) -> None:
        self.sessions.close(None)
        self.listener.close()


def start_compute(
    config: AgentConfig, node_id: str, on_invite: Callable[[str], None]
) -> ComputeSide:
    """Loads torch, measures the device and opens the data listener."""
    if config.memory_limit_bytes:
        tame_allocator()  # freed buffers go back to the kernel: the limit is a promise
    else:
        fast_allocator()
    torch.set_num_threads(config.threads or default_threads())
    profile = profile_device(config.data_dir, config.memory_limit_bytes)
    store = ShardStore(config.data_dir, cache_limit_bytes=config.cache_limit_bytes)
    listener = DataListener(config.host, config.data_port)
    sessions = AgentSessions(
        store=store,
        listener=listener,
        node_name=config.name,
        token=config.token,
        memory=MemoryPolicy(
            limit_bytes=config.memory_limit_bytes,
            window_override=config.window_blocks,
            read_bytes_per_s=profile.disk_read_bytes_per_s,
            matmul_gflops=profile.matmul_gflops,
        ),
    )
    service = AgentService(
        store=store,
        on_invite=on_invite,
        sessions=sessions,
        status=lambda: runtime_to_pb(sessions.runtime(), node_id),
    )
    return ComputeSide(profile, store, listener, sessions, service)
