"""A real cluster for parity tests: an in-process coordinator, agent processes on loopback.

The coordinator runs in the test process (so tests choose the plan: node counts and
deliberately uneven capacities); the agents are real `edge-agent` processes that
receive their shards and follow the hub's steps over the data channel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from edgecluster.comm.communicator import Communicator
from edgecluster.config import CoordinatorConfig
from edgecluster.engine.hub import HubModel
from edgecluster.runtime.coordinator import CoordinatorNode
from edgecluster.runtime.serving import ServingCluster
from edgecluster.types import MemberInfo

TOKEN = "parity-token"


class ParityCluster:
    def __init__(
        self,
        root: Path,
        num_agents: int,
        *,
        launcher: Callable[..., subprocess.Popen] = subprocess.Popen,
        agent_args: Sequence[str] = (),
        per_agent_args: Sequence[Sequence[str]] = (),
    ) -> None:
        """`agent_args` go to every agent, `per_agent_args[i]` to agent i only."""
        self.root = root
        self.node = CoordinatorNode(
            CoordinatorConfig(
                token=TOKEN, grpc_port=0, http_port=0, mdns=False, cache_dir=root / "cache"
            )
        )
        env = {**os.environ, "EDGE_TOKEN": TOKEN, "EDGE_CACHE_DIR": str(root / "cache")}
        self.procs = [
            launcher(
                [
                    sys.executable,
                    "-m",
                    "agents.cli",
                    "join",
                    self.node.grpc_address,
                    "--name",
                    f"parity-{i}",
                    "--no-mdns",
                    "--threads",
                    "1",
                    "--data-dir",
                    str(root / f"agent-{i}"),
                    "--log-level",
                    "WARNING",
                    *agent_args,
                    *(per_agent_args[i] if i < len(per_agent_args) else ()),
                ],
                env=env,
            )
            for i in range(num_agents)
        ]
        deadline = time.monotonic() + 60
        while len(self.members()) < num_agents:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(self.members())}/{num_agents} agents joined")
            time.sleep(0.1)

    def members(self) -> list[MemberInfo]:
        """Alive agents with their measured profile (they join first, then measure)."""
        alive = self.node.membership.alive()
        return sorted((m for m in alive if m.profile.matmul_gflops > 0), key=lambda m: m.name)

    def serving(
        self,
        model_dir: Path,
        max_context: int = 2048,
        weights: str | None = "fp32",
        cluster_file: str | None = None,
    ) -> ServingCluster:
        """Serves `model_dir` with `weights` (fp32 by default: the parity oracle's
        precision; None: what the checkpoint holds, as `serve` chooses), its links
        emulated as `cluster_file` says (agents are parity-<i>)."""
        config = CoordinatorConfig(
            token=TOKEN,
            grpc_port=0,
            http_port=0,
            mdns=False,
            cache_dir=self.root / "cache",
            max_context=max_context,
            weights=weights,
            cluster_file=cluster_file,
        )
        return ServingCluster(
            config, self.node.membership, model_dir, model_dir.name, supervise=False
        )

    def close(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.node.stop()


def greedy(
    cluster: ServingCluster,
    members: Sequence[MemberInfo],
    weights: Sequence[float],
    prompt: list[int],
    new_tokens: int,
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and per-step logits [V] from the distributed model."""
    plan = cluster.plan(list(members), weights=weights)
    comm = cluster.open_session(plan, list(members))
    return greedy_on(cluster.hub, comm, prompt, new_tokens)


def greedy_on(
    hub: HubModel, comm: Communicator, prompt: list[int], new_tokens: int
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and per-step logits [V] over an open session."""
    tokens, logits = [], []
    step_ids, start = list(prompt), 0
    lock = threading.Lock()  # the scheduler is idle: we drive the hub directly
    with lock:
        for _ in range(new_tokens):
            out = hub.forward(comm, torch.tensor(step_ids), [(1, start, len(step_ids))])
            start += len(step_ids)
            token = int(out[0].argmax())
            tokens.append(token)
            logits.append(out[0])
            step_ids = [token]
        hub.free(comm, [1])
    return tokens, logits
