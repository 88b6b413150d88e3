"""A coordinator in the test process and real agent processes, for training sessions.

The test drives `TrainingSession` itself (any hand-made plan), the agents are real
`edge-agent join` processes on 127.0.0.1, and every tensor crosses real links.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from edgecluster.config import CoordinatorConfig
from edgecluster.model_config import ModelConfig
from edgecluster.net.datachannel import DataListener
from edgecluster.net.grpc_util import open_channel
from edgecluster.net.pb import edgecluster_pb2_grpc as pb_grpc
from edgecluster.plan.cluster_file import ClusterSpec, DeviceSpec, LinkSpec
from edgecluster.plan.pipeline import PipelineOptions, PipelinePlan, plan_pipeline
from edgecluster.plan.pipeline_stages import Stage, StageAllocation
from edgecluster.runtime.coordinator import CoordinatorNode
from edgecluster.runtime.session_open import SessionLinks
from edgecluster.train.session import TrainingSession
from edgecluster.train.spec import Hyper, spec_from_plan
from edgecluster.types import MemberInfo
from tests.procs import ProcessPool, free_port

TOKEN = "train-test-token"


class TrainHarness:
    def __init__(self, pool: ProcessPool, names: Sequence[str]) -> None:
        self.config = CoordinatorConfig(
            token=TOKEN, model="none", grpc_port=free_port(), http_port=free_port(), mdns=False,
            cache_dir=pool.root / "coordinator-cache", heartbeat_timeout_s=10.0,
        )  # fmt: skip
        self.node = CoordinatorNode(self.config)
        self.node.start()
        self.listener = DataListener("127.0.0.1", 0)
        self.links = SessionLinks(
            listener=self.listener, host="127.0.0.1", token=TOKEN,
            stub_for=lambda m: pb_grpc.AgentStub(open_channel(m.address, TOKEN)),
        )  # fmt: skip
        self.agents = {
            name: pool.agent(self.node.grpc_address, token=TOKEN, name=name) for name in names
        }
        deadline = time.monotonic() + 90
        while {m.name for m in self.node.membership.alive() if m.data_port} < set(names):
            assert time.monotonic() < deadline, "the agents did not join within 90 s"
            time.sleep(0.2)

    def members(self, names: Sequence[str]) -> list[MemberInfo]:
        alive = {m.name: m for m in self.node.membership.alive()}
        return [alive[n] for n in names]

    def session(self, plan: PipelinePlan, cfg: ModelConfig, hyper: Hyper) -> TrainingSession:
        ranked = self.members(plan.allocation.agents)
        rank_of = {m.name: r for r, m in enumerate(ranked, 1)}
        spec = spec_from_plan(run_id=f"run-{time.monotonic_ns()}", model=cfg, plan=plan,
                              rank_of=rank_of, hyper=hyper)  # fmt: skip
        return TrainingSession(self.links, spec, ranked)

    def close(self) -> None:
        self.listener.close()
        self.node.stop()


def cluster(names: Sequence[str]) -> ClusterSpec:
    devices = tuple(
        DeviceSpec(
            name=n, gflops=10.0, memory_bytes=1 << 32, cpu_quota=1.0, disk_read_bytes_per_s=1e8
        )  # fmt: skip
        for n in names
    )
    return ClusterSpec(devices=devices, default_link=LinkSpec(latency_ms=0.1, bandwidth_mb_s=1e3))


def hand_plan(
    cfg: ModelConfig,
    stages: Sequence[tuple[int, int, Sequence[str]]],
    options: PipelineOptions,
) -> PipelinePlan:
    """The plan of `options.schedule` on stages given as (layer_start, layer_end, agents);
    the first is stage 0 (its layer range is ignored)."""
    built = tuple(
        Stage(
            index=i,
            layer_start=0 if i == 0 else a,
            layer_end=0 if i == 0 else b,
            agents=tuple(agents),
        )  # fmt: skip
        for i, (a, b, agents) in enumerate(stages)
    )
    names = sorted({n for _, _, agents in stages for n in agents})
    allocation = StageAllocation(
        stages=built,
        memory_slots=dict.fromkeys(names, 64),
        speeds_gflops=dict.fromkeys(names, 10.0),
    )
    return plan_pipeline(cluster(names), cfg, options, allocation=allocation)


def batches(
    cfg: ModelConfig, count: int, micro: int, seq_len: int, seed: int
) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, cfg.vocab_size, (micro, seq_len + 1), generator=gen) for _ in range(count)
    ]


def save_tiny(path: Path, *, layers: int, tied: bool, vocab: int = 96) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(5)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256,
        tie_word_embeddings=tied, rope_theta=10000.0,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path
