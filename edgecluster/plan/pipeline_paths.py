"""Micro-batch paths through the stages, and SkipPipe's rules for them.

A path is the hops of one micro-batch: (stage, agent) pairs. It starts and ends at
stage 0 on the same agent (the replica that holds the micro-batch's data, embeds it
and computes its loss); in between it visits `path_stages` distinct stages of
1..S-1, in ascending order except for at most `max_swaps` disjoint swaps of two
neighbours on the path (1,3,2,4 is one swap). Every stage 1..S-1 is visited by the
same number of micro-batches in an iteration, and an agent is on the paths of at
most its memory slots of micro-batches (a static bound on what it holds at once,
whatever the processing order; it also rules out waits in a cycle).

`check_paths` enforces these rules; `full_paths` (GPipe, 1F1B) and
`random_skip_paths` build plans that satisfy them; `assign_replicas` picks, stage
by stage, the replica of each hop in proportion to speed within memory slots.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from edgecluster.errors import PlanError
from edgecluster.plan.pipeline_stages import StageAllocation


@dataclass(frozen=True)
class Hop:
    stage: int
    agent: str


@dataclass(frozen=True, kw_only=True)
class MicroBatchPath:
    micro_batch: int
    hops: tuple[Hop, ...]

    @property
    def source(self) -> str:
        return self.hops[0].agent

    @property
    def middle(self) -> tuple[Hop, ...]:
        """The hops between the two stage-0 ends."""
        return self.hops[1:-1]

    @property
    def stages(self) -> tuple[int, ...]:
        return tuple(h.stage for h in self.hops)

    @property
    def agents(self) -> frozenset[str]:
        return frozenset(h.agent for h in self.hops)


@dataclass(frozen=True, kw_only=True)
class PathRules:
    num_micro_batches: int
    path_stages: int  # stages of 1..S-1 each path visits
    max_swaps: int

    def __post_init__(self) -> None:
        if self.num_micro_batches < 1:
            raise ValueError(f"--micro-batches must be >= 1, got {self.num_micro_batches}")
        if self.path_stages < 1:
            raise ValueError(f"a path visits at least one layer stage, got {self.path_stages}")
        if self.max_swaps < 0:
            raise ValueError(f"--max-swaps must be >= 0, got {self.max_swaps}")


def path_stage_count(num_stages: int, skip_ratio: float) -> int:
    """Layer stages a path visits: (S-1) * (1 - skip_ratio), rounded, at least one."""
    if not 0 <= skip_ratio < 1:
        raise ValueError(f"--skip-ratio must be in [0, 1), got {skip_ratio}")
    return max(1, round((num_stages - 1) * (1 - skip_ratio)))


def visits_per_stage(num_stages: int, rules: PathRules) -> int:
    """Micro-batches that visit each layer stage; PlanError when they cannot be equal."""
    others = num_stages - 1
    total = rules.num_micro_batches * rules.path_stages
    if rules.path_stages > others:
        raise PlanError(f"a path cannot visit {rules.path_stages} of {others} layer stages")
    if total % others:
        good = [m for m in range(1, 4 * others + 1) if m * rules.path_stages % others == 0]
        raise PlanError(
            f"{rules.num_micro_batches} micro-batches visiting {rules.path_stages} of {others} "
            f"layer stages each cannot visit every stage equally often; use a multiple of "
            f"{good[0]} micro-batches, another --skip-ratio, or another --stages"
        )
    return total // others


def count_swaps(stages: Sequence[int]) -> int | None:
    """Disjoint neighbour swaps that turn the sorted `stages` into this order; None if none do."""
    target, swaps, i = sorted(stages), 0, 0
    while i < len(stages):
        if stages[i] == target[i]:
            i += 1
        elif i + 1 < len(stages) and (stages[i], stages[i + 1]) == (target[i + 1], target[i]):
            swaps, i = swaps + 1, i + 2
        else:
            return None
    return swaps


def check_paths(
    paths: Sequence[MicroBatchPath], allocation: StageAllocation, rules: PathRules
) -> None:
    """ValueError naming the first broken rule; silent when every rule holds."""
    if [p.micro_batch for p in paths] != list(range(rules.num_micro_batches)):
        raise ValueError(f"paths must be micro-batches 0..{rules.num_micro_batches - 1} in order")
    counts = [0] * allocation.num_stages
    held: dict[str, int] = {}
    for path in paths:
        _check_path(path, allocation, rules)
        for hop in path.middle:
            counts[hop.stage] += 1
        for agent in path.agents:
            held[agent] = held.get(agent, 0) + 1
    if len(set(counts[1:])) != 1:
        raise ValueError(f"layer stages are visited unequally: {counts[1:]} micro-batches")
    for agent, count in held.items():
        if count > allocation.memory_slots[agent]:
            raise ValueError(
                f"agent {agent} is on {count} paths but holds at most "
                f"{allocation.memory_slots[agent]} micro-batches"
            )


def _check_path(path: MicroBatchPath, allocation: StageAllocation, rules: PathRules) -> None:
    where = f"micro-batch {path.micro_batch}"
    hops = path.hops
    if len(hops) != rules.path_stages + 2:
        raise ValueError(f"{where}: {len(hops) - 2} layer stages, expected {rules.path_stages}")
    if hops[0] != hops[-1] or hops[0].stage != 0:
        raise ValueError(f"{where}: must start and end at stage 0 on the same agent")
    middle = [h.stage for h in path.middle]
    if len(set(middle)) != len(middle) or not all(0 < s < allocation.num_stages for s in middle):
        raise ValueError(f"{where}: visits stages {middle}; each of 1..S-1 at most once")
    swaps = count_swaps(middle)
    if swaps is None or swaps > rules.max_swaps:
        raise ValueError(
            f"{where}: order {middle} is not the ascending order with at most "
            f"{rules.max_swaps} disjoint neighbour swaps"
        )
    for hop in hops:
        if hop.agent not in allocation.stages[hop.stage].agents:
            raise ValueError(f"{where}: agent {hop.agent} does not hold stage {hop.stage}")


def assign_replicas(
    allocation: StageAllocation,
    stage_orders: Sequence[Sequence[int]],
    *,
    prefer: Mapping[tuple[int, int], str] | None = None,
) -> list[MicroBatchPath]:
    """Paths from each micro-batch's stage order, the agents chosen stage by stage.

    A hop goes to the replica with the least (load + 1) / speed that still has a memory
    slot for the micro-batch (or to `prefer[(micro_batch, stage)]` when that fits).
    """
    held: dict[str, set[int]] = {a: set() for a in allocation.agents}
    load: dict[tuple[int, str], int] = {}
    chosen: dict[tuple[int, int], str] = {}
    all_stages = sorted({0, *(s for order in stage_orders for s in order)})
    for stage in all_stages:
        for mb, order in enumerate(stage_orders):
            if stage != 0 and stage not in order:
                continue
            chosen[(mb, stage)] = _pick(allocation, stage, mb, held, load, prefer)
    return [
        MicroBatchPath(
            micro_batch=mb,
            hops=tuple(Hop(s, chosen[(mb, s)]) for s in (0, *order, 0)),
        )
        for mb, order in enumerate(stage_orders)
    ]


def _pick(
    allocation: StageAllocation,
    stage: int,
    mb: int,
    held: dict[str, set[int]],
    load: dict[tuple[int, str], int],
    prefer: Mapping[tuple[int, int], str] | None,
) -> str:
    def fits(agent: str) -> bool:
        return mb in held[agent] or len(held[agent]) < allocation.memory_slots[agent]

    replicas = [a for a in allocation.stages[stage].agents if fits(a)]
    if not replicas:
        raise PlanError(
            f"stage {stage}'s agents ({', '.join(allocation.stages[stage].agents)}) have no "
            f"memory slot left for micro-batch {mb}; use fewer --micro-batches, a smaller "
            f"--micro-batch, or add agents"
        )
    wanted = prefer.get((mb, stage)) if prefer else None
    if wanted not in replicas:
        speeds = allocation.speeds_gflops
        wanted = min(replicas, key=lambda a: (load.get((stage, a), 0) + 1) / speeds[a])
    held[wanted].add(mb)
    load[(stage, wanted)] = load.get((stage, wanted), 0) + 1
    return wanted


def full_paths(allocation: StageAllocation, num_micro_batches: int) -> list[MicroBatchPath]:
    """Every micro-batch through every stage in order (GPipe, 1F1B)."""
    order = list(range(1, allocation.num_stages))
    return assign_replicas(allocation, [order] * num_micro_batches)


def cyclic_skip_orders(
    num_stages: int, rules: PathRules, permutation: Sequence[int]
) -> list[list[int]]:
    """Stage orders that skip stages dealt cyclically from `permutation` of 1..S-1.

    Micro-batch m skips the next S-1-path_stages stages of the endless repetition of
    `permutation`: distinct within a path, and, when the visits can be equal, every
    stage is skipped equally often.
    """
    others = num_stages - 1
    skip = others - rules.path_stages
    orders = []
    for mb in range(rules.num_micro_batches):
        skipped = {permutation[(mb * skip + j) % others] for j in range(skip)}
        orders.append([s for s in range(1, num_stages) if s not in skipped])
    return orders


def random_skip_paths(
    allocation: StageAllocation, rules: PathRules, *, seed: int
) -> list[MicroBatchPath]:
    """Random skipping with equal visits: a random cyclic skip pattern dealt to the
    micro-batches in random order; replicas in proportion to speed, as for GPipe."""
    visits_per_stage(allocation.num_stages, rules)
    rng = random.Random(seed)
    permutation = list(range(1, allocation.num_stages))
    rng.shuffle(permutation)
    orders = cyclic_skip_orders(allocation.num_stages, rules, permutation)
    rng.shuffle(orders)
    return assign_replicas(allocation, orders)
