"""Typed domain values shared by every layer. Protobuf never appears here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NewType

NodeId = NewType("NodeId", str)


@dataclass(frozen=True, kw_only=True)
class DeviceProfile:
    """What an agent measured about its device at start."""

    cpu_count: int
    memory_total_bytes: int
    memory_available_bytes: int
    disk_free_bytes: int
    disk_read_bytes_per_s: float
    matmul_gflops: float
    accelerator: str = "none"
    memory_limit_bytes: int = 0  # 0: no promise made
    runtime_rss_bytes: int = 0  # resident memory of the agent before any weights
    cpu_limit: float = 0.0  # CPUs a quota allows (0: no quota)

    @property
    def memory_budget_bytes(self) -> int:
        """Memory the agent may use: its promised limit, else what is available."""
        if self.memory_limit_bytes:
            return min(self.memory_limit_bytes, self.memory_available_bytes)
        return self.memory_available_bytes


@dataclass(frozen=True, kw_only=True)
class AgentRuntime:
    """What an agent reports with each heartbeat about its serving session."""

    session_id: str = ""
    streaming: bool = False
    window_blocks: int = 0
    read_bytes_per_s: float = 0.0
    weight_bytes: int = 0
    resident_weight_bytes: int = 0
    rss_bytes: int = 0
    peak_rss_bytes: int = 0


@dataclass(frozen=True, kw_only=True)
class MemberInfo:
    """One agent as the coordinator sees it."""

    id: NodeId
    name: str
    address: str  # host:port of its gRPC server
    data_port: int
    state: str  # alive | dead | left
    profile: DeviceProfile
    last_seen_s_ago: float = 0.0
    runtime: AgentRuntime = field(default_factory=AgentRuntime)

    def to_json(self) -> dict[str, object]:
        p = self.profile
        return {
            "id": self.id,
            "name": self.name,
            "address": self.address,
            "state": self.state,
            "cpu_count": p.cpu_count,
            "cpu_limit": p.cpu_limit,
            "memory_total_bytes": p.memory_total_bytes,
            "memory_available_bytes": p.memory_available_bytes,
            "memory_limit_bytes": p.memory_limit_bytes,
            "disk_free_bytes": p.disk_free_bytes,
            "disk_read_bytes_per_s": p.disk_read_bytes_per_s,
            "matmul_gflops": p.matmul_gflops,
            "accelerator": p.accelerator,
            "last_seen_s_ago": round(self.last_seen_s_ago, 3),
            "rss_bytes": self.runtime.rss_bytes,
            "peak_rss_bytes": self.runtime.peak_rss_bytes,
        }


@dataclass(frozen=True, kw_only=True)
class ShardSpec:
    """What one agent holds of every layer: half-open ranges of heads and columns."""

    q_head_start: int
    q_head_end: int
    kv_head_start: int
    kv_head_end: int
    mlp_col_start: int
    mlp_col_end: int
    holds_output_bias: bool = False  # exactly one agent adds o_proj / down_proj biases

    @property
    def num_q_heads(self) -> int:
        return self.q_head_end - self.q_head_start

    @property
    def num_kv_heads(self) -> int:
        return self.kv_head_end - self.kv_head_start

    @property
    def num_mlp_cols(self) -> int:
        return self.mlp_col_end - self.mlp_col_start


@dataclass(frozen=True, kw_only=True)
class SegmentMeta:
    """One sequence's slice of a packed batch: tokens [offset, offset+num_tokens) of the step."""

    seq_id: int
    start_pos: int  # position of the first of these tokens in the sequence
    num_tokens: int
    extras: dict[str, int] = field(default_factory=dict)
