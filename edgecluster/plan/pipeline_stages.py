"""Stage allocation for pipeline training: stages, their layers and their agents.

Pure: (cluster, pipeline costs, options) -> StageAllocation. Stage 0 holds the
embedding, the final norm, the LM head and the loss (no decoder layers); stages
1..S-1 hold contiguous, half-open layer ranges covering every layer once.

With at least as many agents as stages, every agent holds one stage. Stage 0 gets
the share of the cluster's speed its work asks for (each micro-batch visits it, and
the LM head of a large vocabulary is heavy), so it may have more replicas than the
others; the other agents are dealt to stages 1..S-1 in a snake over their speeds,
so the groups' speeds are close, and each stage's layer count is in proportion to
its group's speed, capped by what its smallest member can hold. With fewer agents
than stages, stage k goes to agent k mod N (one agent holds them all).

Memory per agent: its runtime, plus weights, gradients and AdamW state of what it
holds, plus, per micro-batch it may hold at once (a memory slot), what backward
needs. An agent must have at least one slot; `max_memory_slots` caps them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from edgecluster.errors import PlanError
from edgecluster.plan.cluster_file import ClusterSpec
from edgecluster.plan.pipeline_cost import BACKWARD_FACTOR, PipelineCosts
from edgecluster.plan.split import split_units
from edgecluster.units import format_bytes

RUNTIME_BYTES = 400 * 1024**2  # python + torch + buffers of an agent, estimated


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One pipeline stage: its layers [layer_start, layer_end) and its replicas."""

    index: int
    layer_start: int
    layer_end: int
    agents: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.agents:
            raise ValueError(f"stage {self.index} has no agent")
        if self.index == 0 and self.layer_start != self.layer_end:
            raise ValueError("stage 0 holds the embedding and the head, no decoder layers")
        if self.index > 0 and not 0 <= self.layer_start < self.layer_end:
            raise ValueError(
                f"stage {self.index} needs at least one layer, got "
                f"[{self.layer_start}, {self.layer_end})"
            )

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start


@dataclass(frozen=True, kw_only=True)
class StageAllocation:
    stages: tuple[Stage, ...]
    memory_slots: Mapping[str, int]  # micro-batches an agent may hold at once
    speeds_gflops: Mapping[str, float]

    def __post_init__(self) -> None:
        if len(self.stages) < 2:
            raise ValueError("a pipeline needs stage 0 and at least one layer stage")
        expected = 0
        for k, stage in enumerate(self.stages):
            if stage.index != k:
                raise ValueError(f"stage {k} carries index {stage.index}")
            if k > 0 and stage.layer_start != expected:
                raise ValueError(f"stage {k} starts at layer {stage.layer_start}, not {expected}")
            expected = stage.layer_end if k > 0 else 0
        for agent in self.agents:
            if self.memory_slots.get(agent, 0) < 1:
                raise ValueError(f"agent {agent} has no memory slot")

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def num_layers(self) -> int:
        return self.stages[-1].layer_end

    @property
    def agents(self) -> tuple[str, ...]:
        """Every agent holding a stage, in order of first appearance."""
        return tuple(dict.fromkeys(a for s in self.stages for a in s.agents))

    def stages_of(self, agent: str) -> tuple[int, ...]:
        return tuple(s.index for s in self.stages if agent in s.agents)


def allocate_stages(
    cluster: ClusterSpec,
    costs: PipelineCosts,
    *,
    num_stages: int,
    visit_fraction: float,
    max_memory_slots: int | None = None,
    runtime_bytes: int = RUNTIME_BYTES,
) -> StageAllocation:
    """`num_stages` stages over the cluster's devices; PlanError when they cannot fit.

    `visit_fraction` is the share of micro-batches that visit a layer stage (1 - skip
    ratio; 1 for a full pipeline): it sets stage 0's share of the cluster's speed.
    """
    if not 0 < visit_fraction <= 1:
        raise ValueError(f"visit_fraction must be in (0, 1], got {visit_fraction}")
    if max_memory_slots is not None and max_memory_slots < 1:
        raise ValueError(f"max_memory_slots must be >= 1, got {max_memory_slots}")
    speeds = {d.name: d.gflops for d in cluster.devices}
    order = sorted(speeds, key=lambda n: (-speeds[n], n))
    layers = costs.num_layers
    if not 2 <= num_stages <= layers + 1:
        raise PlanError(
            f"--stages {num_stages} does not fit a model of {layers} layers: use 2.."
            f"{layers + 1} (stage 0 plus at least one layer per stage)"
        )
    if len(order) >= num_stages:
        stage0 = _stage0_agents(order, speeds, costs, visit_fraction, min_others=num_stages - 1)
        rest = [n for n in order if n not in stage0]
        groups = [stage0, *_snake(rest, num_stages - 1)]
    else:
        groups = [[order[k % len(order)]] for k in range(num_stages)]
    counts = _layer_counts(groups, speeds, costs, cluster, runtime_bytes)
    stages, start = [Stage(index=0, layer_start=0, layer_end=0, agents=tuple(groups[0]))], 0
    for k in range(1, num_stages):
        stages.append(
            Stage(
                index=k, layer_start=start, layer_end=start + counts[k - 1], agents=tuple(groups[k])
            )
        )
        start += counts[k - 1]
    slots = _memory_slots(stages, costs, cluster, runtime_bytes, max_memory_slots)
    return StageAllocation(stages=tuple(stages), memory_slots=slots, speeds_gflops=speeds)


def _stage0_agents(
    order: Sequence[str],
    speeds: Mapping[str, float],
    costs: PipelineCosts,
    visit_fraction: float,
    *,
    min_others: int,
) -> list[str]:
    """Fastest-first agents whose speed comes closest to stage 0's share of the work."""
    stage0_work = costs.loss_flops + 2 * costs.embed_forward_flops
    layer_work = (
        visit_fraction * costs.num_layers * (1 + BACKWARD_FACTOR) * costs.layer_forward_flops
    )
    target = sum(speeds.values()) * stage0_work / (stage0_work + layer_work)
    chosen: list[str] = []
    total = 0.0
    for name in order:
        if len(order) - len(chosen) <= min_others:
            break
        if chosen and total + speeds[name] / 2 > target:
            continue
        chosen.append(name)
        total += speeds[name]
    return chosen or [order[0]]


def _snake(names: Sequence[str], num_groups: int) -> list[list[str]]:
    """Deal `names` (fastest first) to groups 0,1,..,n-1,n-1,..,0,0,1..: even speed sums."""
    groups: list[list[str]] = [[] for _ in range(num_groups)]
    for i, name in enumerate(names):
        lap, pos = divmod(i, num_groups)
        groups[pos if lap % 2 == 0 else num_groups - 1 - pos].append(name)
    return groups


def _layer_counts(
    groups: Sequence[Sequence[str]],
    speeds: Mapping[str, float],
    costs: PipelineCosts,
    cluster: ClusterSpec,
    runtime_bytes: int,
) -> list[int]:
    """Layers per stage 1..S-1: at least one each, the rest in proportion to speed."""
    held = {n: sum(n in g for g in groups[1:]) for g in groups for n in g}
    shares, caps = [], []
    per_layer = costs.layer_param_bytes + costs.layer_saved_bytes
    for group in groups[1:]:
        shares.append(sum(speeds[n] / max(1, held[n]) for n in group))
        rooms = []
        for n in group:
            room = cluster.device(n).memory_bytes - runtime_bytes
            if n in groups[0]:
                room -= costs.stage0_param_bytes + costs.head_saved_bytes
            rooms.append(room / max(1, held[n]))
        caps.append(max(0, math.floor(min(rooms) / per_layer) - 1))
    extra = costs.num_layers - len(shares)
    return [1 + c for c in split_units(extra, shares, caps)]


def _memory_slots(
    stages: Sequence[Stage],
    costs: PipelineCosts,
    cluster: ClusterSpec,
    runtime_bytes: int,
    max_memory_slots: int | None,
) -> dict[str, int]:
    slots: dict[str, int] = {}
    for name in dict.fromkeys(a for s in stages for a in s.agents):
        held = [s for s in stages if name in s.agents]
        params = sum(
            costs.stage0_param_bytes if s.index == 0 else s.num_layers * costs.layer_param_bytes
            for s in held
        )
        saved = sum(
            costs.head_saved_bytes if s.index == 0 else s.num_layers * costs.layer_saved_bytes
            for s in held
        )
        memory = cluster.device(name).memory_bytes
        count = (memory - runtime_bytes - params) // max(1, saved)
        if count < 1:
            what = ", ".join(_stage_label(s) for s in held)
            need = format_bytes(runtime_bytes + params + saved)
            raise PlanError(
                f"agent {name} cannot hold {what}: it needs {need} "
                f"(runtime, weights + gradients + AdamW state, one micro-batch's activations) "
                f"and has {format_bytes(memory)}; add agents or memory, use more --stages, or a "
                f"smaller --micro-batch / --seq-len"
            )
        slots[name] = int(count if max_memory_slots is None else min(count, max_memory_slots))
    return slots


def _stage_label(stage: Stage) -> str:
    if stage.index == 0:
        return "stage 0 (embedding, head, loss)"
    return f"stage {stage.index} (layers {stage.layer_start}..{stage.layer_end - 1})"
