"""Tensor-parallel split of a Llama-family model over agents, in proportion to capacity.

Pure: (agent capacities, model config, options) -> TensorParallelPlan; no I/O.

Attention splits by heads. With no more agents than KV heads the unit is a whole KV
group (its query heads); with more, the unit is a query head, and an agent computes
K and V for every group its query heads touch (those k, v rows are replicated on each
such agent, as vLLM does when tp > kv heads). Each agent's q heads are one contiguous
range and its kv range is the groups they touch. The MLP splits by intermediate
columns, one contiguous range each (for int4 weights in whole quantization groups, 32
columns where the model allows). Ranges follow the order the agents are given; an
agent may get nothing (start == end). Shares are matmul_gflops, or `weights`.

Sizes are as stored: `weights_mode` (weights.quant) says how the matrices are stored
(int8 and int4 blocks take their packed bytes in memory too, no expansion), norms and
biases take `storage_bytes_per_element`.

Memory: an agent's room for weights is its budget less its runtime, its KV cache and
an activation slack. The KV cache is reserved for `kv_budget_tokens` positions (the
most the scheduler lets the admitted requests hold at once, summed over sequences),
at `kv_bytes_per_element`, not for a full context per agent. Shares are water-filled
under the rooms, so whole shards go where they fit. When the model does not fit the
cluster, the overflow is spread in proportion to share and agents holding more than
their room stream their blocks through a sliding window (streaming.py); with
allow_streaming=False that is a PlanError instead.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from edgecluster.errors import PlanError
from edgecluster.model_config import ModelConfig
from edgecluster.plan.blocks import full_model_layer_bytes, shard_block_bytes
from edgecluster.plan.shard_split import (
    ShardSizing,
    build_specs,
    mlp_caps,
    split_attention,
    split_mlp_columns,
)
from edgecluster.plan.split import water_fill
from edgecluster.plan.streaming import MEMORY_KNOBS, choose_window
from edgecluster.types import DeviceProfile, ShardSpec
from edgecluster.units import format_bytes

log = logging.getLogger(__name__)

ACTIVATION_SLACK_BYTES = 64 * 1024**2  # activations and buffers of a step, per agent
# Stored bytes per matrix element, to count a block's multiply-adds from its bytes.
ELEMENT_BYTES: dict[str, float] = {"fp32": 4, "bf16": 2, "int8": 1, "int4": 0.5}


@dataclass(frozen=True, kw_only=True)
class AgentCapacity:
    """What the planner knows of one agent."""

    node_id: str
    name: str
    matmul_gflops: float
    memory_budget_bytes: int  # memory the agent may use for everything
    runtime_bytes: int  # what its runtime (python + torch) already takes, estimated
    disk_read_bytes_per_s: float

    def __post_init__(self) -> None:
        if not self.node_id:
            raise ValueError(f"agent {self.name!r} has an empty node_id")
        if not (math.isfinite(self.matmul_gflops) and self.matmul_gflops >= 0):
            raise ValueError(
                f"agent {self.name}: matmul_gflops must be >= 0, got {self.matmul_gflops}"
            )
        if self.memory_budget_bytes < 0 or self.runtime_bytes < 0:
            raise ValueError(
                f"agent {self.name}: memory_budget_bytes ({self.memory_budget_bytes}) and "
                f"runtime_bytes ({self.runtime_bytes}) must be >= 0"
            )
        if not (math.isfinite(self.disk_read_bytes_per_s) and self.disk_read_bytes_per_s > 0):
            raise ValueError(
                f"agent {self.name}: disk_read_bytes_per_s must be positive, got "
                f"{self.disk_read_bytes_per_s}; profile its disk first"
            )

    @classmethod
    def from_profile(
        cls, *, node_id: str, name: str, profile: DeviceProfile, runtime_bytes: int
    ) -> AgentCapacity:
        return cls(
            node_id=node_id,
            name=name,
            matmul_gflops=profile.matmul_gflops,
            memory_budget_bytes=profile.memory_budget_bytes,
            runtime_bytes=runtime_bytes,
            disk_read_bytes_per_s=profile.disk_read_bytes_per_s,
        )


@dataclass(frozen=True, kw_only=True)
class AgentPlacement:
    """One agent's part of a tensor-parallel plan."""

    node_id: str
    name: str
    rank: int  # 1..N; rank 0 is the coordinator, the hub
    spec: ShardSpec
    weight_bytes: int  # bytes of its blocks, every layer, in storage dtype
    streaming: bool  # its weight_bytes do not fit its room
    window_blocks: int  # blocks resident when streaming; 0 = all resident
    expected_stall_s_per_token: float = 0.0  # estimate, from its disk and matmul speed

    def __post_init__(self) -> None:
        s = self.spec
        bounds = ((s.q_head_start, s.q_head_end), (s.kv_head_start, s.kv_head_end))
        if any(
            start < 0 or start > end for start, end in (*bounds, (s.mlp_col_start, s.mlp_col_end))
        ):
            raise ValueError(f"agent {self.name}: shard ranges must be 0 <= start <= end, got {s}")
        if self.rank < 1:
            raise ValueError(
                f"agent {self.name}: rank must be >= 1 (0 is the hub), got {self.rank}"
            )
        if self.weight_bytes < 0:
            raise ValueError(
                f"agent {self.name}: weight_bytes must be >= 0, got {self.weight_bytes}"
            )
        if self.streaming != (self.window_blocks > 0) or self.window_blocks == 1:
            raise ValueError(
                f"agent {self.name}: a streaming agent keeps a window of >= 2 blocks and a "
                f"resident one has window_blocks 0; got streaming={self.streaming}, "
                f"window_blocks={self.window_blocks}"
            )


@dataclass(frozen=True, kw_only=True)
class TensorParallelPlan:
    """Every agent's shard; q heads and MLP columns are partitioned in rank order."""

    placements: tuple[AgentPlacement, ...]
    storage_bytes_per_element: int
    kv_budget_tokens: int = 2048  # KV positions reserved on every agent, over all sequences
    weights_mode: str | None = None  # how the matrices are stored; None: dense

    def __post_init__(self) -> None:
        if not self.placements:
            raise ValueError("a tensor-parallel plan needs at least one placement")
        if self.kv_budget_tokens < 1:
            raise ValueError(f"kv_budget_tokens must be >= 1, got {self.kv_budget_tokens}")
        if self.storage_bytes_per_element < 1:
            raise ValueError(
                f"storage_bytes_per_element must be >= 1, got {self.storage_bytes_per_element}"
            )
        ranks = [p.rank for p in self.placements]
        if ranks != list(range(1, len(ranks) + 1)):
            raise ValueError(f"placements must have ranks 1..{len(ranks)} in order, got {ranks}")
        _check_contiguous(self.placements, "q heads", lambda s: (s.q_head_start, s.q_head_end))
        _check_contiguous(
            self.placements, "MLP columns", lambda s: (s.mlp_col_start, s.mlp_col_end)
        )
        holders = [p.name for p in self.placements if p.spec.holds_output_bias]
        if len(holders) != 1:
            raise ValueError(f"exactly one agent must hold the output biases, got {holders}")

    @property
    def streaming(self) -> bool:
        return any(p.streaming for p in self.placements)

    @property
    def total_weight_bytes(self) -> int:
        return sum(p.weight_bytes for p in self.placements)

    def placement_for(self, node_id: str) -> AgentPlacement:
        for placement in self.placements:
            if placement.node_id == node_id:
                return placement
        raise KeyError(f"node {node_id} has no placement in this plan")

    def describe(self) -> str:
        """A readable table: one row per agent."""
        header = (
            f"{'rank':>4}  {'agent':<16} {'q heads':<10} {'kv heads':<10} {'mlp cols':<14} "
            f"{'weights':>10}  memory"
        )
        rows = [header, *(_describe_row(p) for p in self.placements)]
        stored = (
            f"stored as {self.weights_mode}"
            if self.weights_mode
            else f"at {self.storage_bytes_per_element} bytes per element"
        )
        rows.append(
            f"total weights {format_bytes(self.total_weight_bytes)} {stored}; KV budget "
            f"{self.kv_budget_tokens} tokens"
        )
        return "\n".join(rows)


def plan_tensor_parallel(
    agents: Sequence[AgentCapacity],
    cfg: ModelConfig,
    *,
    storage_bytes_per_element: int = 4,
    compute_bytes_per_element: int = 4,
    kv_budget_tokens: int = 2048,
    kv_bytes_per_element: int | None = None,
    weights: Sequence[float] | None = None,
    allow_streaming: bool = True,
    activation_slack_bytes: int = ACTIVATION_SLACK_BYTES,
    weights_mode: str | None = None,
) -> TensorParallelPlan:
    """Split `cfg`'s layers over `agents` (ranks 1..N in the order given).

    PlanError when there are no agents, when the model does not fit and streaming is
    not allowed, or when a streaming agent cannot hold two of its largest blocks.
    """
    shares = _shares(agents, weights)
    sizing = ShardSizing(
        cfg,
        storage_bytes_per_element,
        compute_bytes_per_element,
        kv_budget_tokens,
        kv_bytes_per_element or compute_bytes_per_element,
        weights_mode,
    )
    # room for weights and KV cache, per agent
    rooms = [a.memory_budget_bytes - a.runtime_bytes - activation_slack_bytes for a in agents]
    full_need = full_model_layer_bytes(cfg, storage_bytes_per_element, weights_mode)
    full_need += sizing.kv(cfg.num_kv_heads)
    fractions = water_fill(1.0, shares, [max(0, room) / full_need for room in rooms])
    heads = split_attention(sizing, fractions, rooms)
    cols = split_mlp_columns(sizing, shares, mlp_caps(sizing, rooms, heads))
    specs = build_specs(cfg, heads, cols)
    if not allow_streaming:
        _require_fit(sizing, agents, specs, rooms)
    placements = tuple(
        _place(sizing, agent, rank, spec, room)
        for rank, (agent, spec, room) in enumerate(zip(agents, specs, rooms, strict=True), start=1)
    )
    return TensorParallelPlan(
        placements=placements,
        storage_bytes_per_element=storage_bytes_per_element,
        kv_budget_tokens=kv_budget_tokens,
        weights_mode=weights_mode,
    )


MIN_AUTO_KV_BUDGET_TOKENS = 256


def plan_within_kv_budget(
    agents: Sequence[AgentCapacity],
    cfg: ModelConfig,
    *,
    kv_budget_tokens: int,
    fixed_budget: bool,
    **options: Any,
) -> TensorParallelPlan:
    """plan_tensor_parallel at `kv_budget_tokens`; unless the budget is `fixed_budget`
    (given by the user), a budget that leaves some agent no room to stream is halved
    until the plan works, down to MIN_AUTO_KV_BUDGET_TOKENS (then the PlanError stands)."""
    budget = kv_budget_tokens
    while True:
        try:
            return plan_tensor_parallel(agents, cfg, kv_budget_tokens=budget, **options)
        except PlanError:
            if fixed_budget or budget <= MIN_AUTO_KV_BUDGET_TOKENS:
                raise
            budget = max(MIN_AUTO_KV_BUDGET_TOKENS, budget // 2)
            log.info("KV budget lowered to %d tokens so that every agent has room", budget)


def _shares(agents: Sequence[AgentCapacity], weights: Sequence[float] | None) -> list[float]:
    if not agents:
        raise PlanError("no agents alive; start `edge-agent join` on a device")
    ids = [a.node_id for a in agents]
    if len(set(ids)) != len(ids):
        raise ValueError(f"agents must have distinct node ids, got {ids}")
    if weights is None:
        shares = [a.matmul_gflops for a in agents]
        if not any(share > 0 for share in shares):
            raise ValueError("every agent reports 0 matmul GFLOPS: profile them or pass weights")
        return shares
    if len(weights) != len(agents):
        raise ValueError(f"got {len(weights)} weights for {len(agents)} agents; give one each")
    if any(not math.isfinite(w) or w < 0 for w in weights) or not any(w > 0 for w in weights):
        raise ValueError(f"weights must be finite, >= 0 and not all 0, got {list(weights)}")
    return [float(w) for w in weights]


def _require_fit(
    sizing: ShardSizing,
    agents: Sequence[AgentCapacity],
    specs: Sequence[ShardSpec],
    rooms: Sequence[int],
) -> None:
    needs = [sizing.need(spec) for spec in specs]
    if all(need == 0 or need <= room for need, room in zip(needs, rooms, strict=True)):
        return
    each = ", ".join(
        f"{a.name} needs {format_bytes(need)} of {format_bytes(max(0, room))}"
        for a, need, room in zip(agents, needs, rooms, strict=True)
    )
    raise PlanError(
        f"the model does not fit: its shards and KV caches take {format_bytes(sum(needs))} "
        f"but the agents have {format_bytes(sum(max(0, r) for r in rooms))} of room ({each}) "
        f"for a KV budget of {sizing.kv_tokens} tokens. To make room: {MEMORY_KNOBS}; or "
        "allow streaming."
    )


def _place(
    sizing: ShardSizing, agent: AgentCapacity, rank: int, spec: ShardSpec, base_room: int
) -> AgentPlacement:
    attn, mlp = shard_block_bytes(sizing.cfg, spec, sizing.storage_bpe, sizing.weights_mode)
    weight_bytes = sizing.cfg.num_layers * (attn + mlp)
    room = base_room - sizing.kv(spec.num_kv_heads)
    fits = weight_bytes == 0 or weight_bytes <= room
    window, stall_s = (0, 0.0) if fits else _window(sizing, agent, attn, mlp, room)
    return AgentPlacement(
        node_id=agent.node_id,
        name=agent.name,
        rank=rank,
        spec=spec,
        weight_bytes=weight_bytes,
        streaming=window > 0,
        window_blocks=window,
        expected_stall_s_per_token=stall_s,
    )


def _window(
    sizing: ShardSizing, agent: AgentCapacity, attn: int, mlp: int, room: int
) -> tuple[int, float]:
    """Window and stall estimate of a streaming agent (its compute from matmul_gflops;
    the allreduce is not known here, so the stall is an upper estimate)."""
    blocks = [size for _ in range(sizing.cfg.num_layers) for size in (attn, mlp) if size > 0]
    element_bytes = ELEMENT_BYTES.get(sizing.weights_mode or "", sizing.storage_bpe)
    mean_elements = sum(blocks) / len(blocks) / element_bytes
    flops = agent.matmul_gflops * 1e9
    choice = choose_window(
        block_bytes=blocks,
        room_bytes=room,
        read_bytes_per_s=agent.disk_read_bytes_per_s,
        compute_s_per_block=2 * mean_elements / flops if flops > 0 else 0.0,
        allreduce_s=0.0,
        agent=f"agent {agent.name} ({agent.node_id})",
    )
    return choice.window_blocks, choice.expected_stall_s_per_token


def _check_contiguous(
    placements: Sequence[AgentPlacement], what: str, bounds: Callable[[ShardSpec], tuple[int, int]]
) -> None:
    position = 0
    for p in placements:
        start, end = bounds(p.spec)
        if start != position:
            raise ValueError(
                f"{what} must be contiguous in rank order from 0: agent {p.name} starts at "
                f"{start}, expected {position}"
            )
        position = end


def _describe_row(p: AgentPlacement) -> str:
    s = p.spec
    q = f"{s.q_head_start}:{s.q_head_end}"
    kv = f"{s.kv_head_start}:{s.kv_head_end}"
    cols = f"{s.mlp_col_start}:{s.mlp_col_end}"
    memory = "resident"
    if p.streaming:
        stall_ms = p.expected_stall_s_per_token * 1e3
        memory = f"streams, window {p.window_blocks} blocks, ~{stall_ms:.1f} ms/token stall"
    bias = " +bias" if s.holds_output_bias else ""
    return (
        f"{p.rank:>4}  {p.name[:16]:<16} {q:<10} {kv:<10} {cols:<14} "
        f"{format_bytes(p.weight_bytes):>10}  {memory}{bias}"
    )
