"""Protobuf <-> domain dataclasses: the one place where they meet."""

from __future__ import annotations

from edgecluster.net.pb import edgecluster_pb2 as pb
from edgecluster.types import AgentRuntime, DeviceProfile, MemberInfo, NodeId, ShardSpec


def profile_to_pb(p: DeviceProfile) -> pb.DeviceProfile:
    return pb.DeviceProfile(
        cpu_count=p.cpu_count,
        memory_total_bytes=p.memory_total_bytes,
        memory_available_bytes=p.memory_available_bytes,
        disk_free_bytes=p.disk_free_bytes,
        disk_read_bytes_per_s=p.disk_read_bytes_per_s,
        matmul_gflops=p.matmul_gflops,
        accelerator=p.accelerator,
        memory_limit_bytes=p.memory_limit_bytes,
        runtime_rss_bytes=p.runtime_rss_bytes,
        cpu_limit=p.cpu_limit,
    )


def profile_from_pb(m: pb.DeviceProfile) -> DeviceProfile:
    if m.cpu_count < 0 or m.memory_total_bytes < 0 or m.memory_limit_bytes < 0:
        raise ValueError("device profile has negative counts")
    return DeviceProfile(
        cpu_count=m.cpu_count,
        memory_total_bytes=m.memory_total_bytes,
        memory_available_bytes=m.memory_available_bytes,
        disk_free_bytes=m.disk_free_bytes,
        disk_read_bytes_per_s=m.disk_read_bytes_per_s,
        matmul_gflops=m.matmul_gflops,
        accelerator=m.accelerator or "none",
        memory_limit_bytes=m.memory_limit_bytes,
        runtime_rss_bytes=m.runtime_rss_bytes,
        cpu_limit=m.cpu_limit,
    )


def runtime_to_pb(r: AgentRuntime, node_id: str) -> pb.AgentStatus:
    return pb.AgentStatus(
        node_id=node_id,
        session_id=r.session_id,
        streaming=r.streaming,
        window_blocks=r.window_blocks,
        read_bytes_per_s=r.read_bytes_per_s,
        weight_bytes=r.weight_bytes,
        resident_weight_bytes=r.resident_weight_bytes,
        rss_bytes=r.rss_bytes,
        peak_rss_bytes=r.peak_rss_bytes,
    )


def runtime_from_pb(m: pb.AgentStatus) -> AgentRuntime:
    return AgentRuntime(
        session_id=m.session_id,
        streaming=m.streaming,
        window_blocks=m.window_blocks,
        read_bytes_per_s=m.read_bytes_per_s,
        weight_bytes=m.weight_bytes,
        resident_weight_bytes=m.resident_weight_bytes,
        rss_bytes=m.rss_bytes,
        peak_rss_bytes=m.peak_rss_bytes,
    )


def member_to_pb(m: MemberInfo) -> pb.Member:
    return pb.Member(
        id=m.id,
        name=m.name,
        address=m.address,
        state=m.state,
        profile=profile_to_pb(m.profile),
        last_seen_s_ago=m.last_seen_s_ago,
        runtime=runtime_to_pb(m.runtime, m.id),
    )


def member_from_pb(m: pb.Member) -> MemberInfo:
    return MemberInfo(
        id=NodeId(m.id),
        name=m.name,
        address=m.address,
        data_port=0,
        state=m.state,
        profile=profile_from_pb(m.profile),
        last_seen_s_ago=m.last_seen_s_ago,
        runtime=runtime_from_pb(m.runtime),
    )


def spec_to_pb(s: ShardSpec) -> pb.ShardSpec:
    return pb.ShardSpec(
        q_head_start=s.q_head_start,
        q_head_end=s.q_head_end,
        kv_head_start=s.kv_head_start,
        kv_head_end=s.kv_head_end,
        mlp_col_start=s.mlp_col_start,
        mlp_col_end=s.mlp_col_end,
        holds_output_bias=s.holds_output_bias,
    )


def spec_from_pb(m: pb.ShardSpec) -> ShardSpec:
    spec = ShardSpec(
        q_head_start=m.q_head_start,
        q_head_end=m.q_head_end,
        kv_head_start=m.kv_head_start,
        kv_head_end=m.kv_head_end,
        mlp_col_start=m.mlp_col_start,
        mlp_col_end=m.mlp_col_end,
        holds_output_bias=m.holds_output_bias,
    )
    if min(spec.num_q_heads, spec.num_kv_heads, spec.num_mlp_cols) < 0 or spec.q_head_start < 0:
        raise ValueError(f"shard spec has reversed or negative ranges: {spec}")
    return spec
