"""SkipPipe's path search: greedy start, then local search scored by the simulator.

Pure and deterministic for a seed. The start is the better of a cyclic skip pattern
(replicas picked in proportion to speed) and the given random-skip paths, so the
result is never worse than random skipping in the simulator. Local search then
tries one move at a time and keeps it when the simulated iteration is no longer
(sideways moves let it cross plateaus):

- exchange a skip: micro-batch a visits x and skips y, b the reverse; they trade
  (with the agents), so every stage keeps its visit count and every agent its load;
- move a hop to another replica of its stage, or exchange two micro-batches'
  replicas at a stage, or move a micro-batch to another stage-0 replica;
- toggle a swap of two neighbouring stages on a path (within --max-swaps).

Every candidate is checked against the path rules before it is simulated. The
search stops after `max_evaluations` simulations or `time_budget_s` seconds.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from edgecluster.plan.cluster_file import ClusterSpec
from edgecluster.plan.pipeline_cost import PipelineCosts
from edgecluster.plan.pipeline_paths import (
    Hop,
    MicroBatchPath,
    PathRules,
    assign_replicas,
    check_paths,
    count_swaps,
    cyclic_skip_orders,
)
from edgecluster.plan.pipeline_sim import Chain, simulate
from edgecluster.plan.pipeline_stages import StageAllocation


@dataclass
class _State:
    orders: list[list[int]]  # layer stages of each micro-batch, in path order
    agents: dict[tuple[int, int], str]  # (micro-batch, stage) -> agent

    @classmethod
    def of(cls, paths: Sequence[MicroBatchPath]) -> _State:
        return cls(
            orders=[[h.stage for h in p.middle] for p in paths],
            agents={(p.micro_batch, h.stage): h.agent for p in paths for h in p.hops},
        )

    def copy(self) -> _State:
        return _State([list(o) for o in self.orders], dict(self.agents))

    def paths(self) -> list[MicroBatchPath]:
        return [
            MicroBatchPath(
                micro_batch=mb, hops=tuple(Hop(s, self.agents[(mb, s)]) for s in (0, *o, 0))
            )
            for mb, o in enumerate(self.orders)
        ]


def search_skip_paths(
    *,
    allocation: StageAllocation,
    rules: PathRules,
    costs: PipelineCosts,
    cluster: ClusterSpec,
    start: Sequence[MicroBatchPath],
    seed: int,
    max_evaluations: int = 500,
    time_budget_s: float = 3.0,
) -> list[MicroBatchPath]:
    """The best paths found; `start` (e.g. random-skip's) is one of the starting points."""

    cache: dict[tuple[int, tuple[Hop, ...]], Chain] = {}

    def score(paths: list[MicroBatchPath]) -> float:
        sim = simulate(
            paths=paths, allocation=allocation, costs=costs, cluster=cluster, chain_cache=cache
        )
        return sim.iteration_s

    permutation = list(range(1, allocation.num_stages))
    cyclic = assign_replicas(
        allocation, cyclic_skip_orders(allocation.num_stages, rules, permutation)
    )
    starts = [cyclic, list(start)]
    scored = [(score(p), i) for i, p in enumerate(starts)]
    best_score, best_index = min(scored)
    state = _State.of(starts[best_index])
    rng = random.Random(seed)
    moves = _moves(allocation, rng)
    deadline = time.monotonic() + time_budget_s
    for _ in range(max_evaluations):
        if time.monotonic() > deadline:
            break
        candidate = state.copy()
        if not rng.choice(moves)(candidate):
            continue
        if not _fits(candidate, allocation, rules):
            continue
        value = score(candidate.paths())
        if value <= best_score:
            state, best_score = candidate, value
    paths = state.paths()
    check_paths(paths, allocation, rules)
    return paths


def _fits(state: _State, allocation: StageAllocation, rules: PathRules) -> bool:
    """The rules a move can break: swaps within bounds, memory slots."""
    for order in state.orders:
        swaps = count_swaps(order)
        if swaps is None or swaps > rules.max_swaps:
            return False
    held: dict[str, set[int]] = {}
    for (mb, _), agent in state.agents.items():
        held.setdefault(agent, set()).add(mb)
    return all(len(mbs) <= allocation.memory_slots[a] for a, mbs in held.items())


def _moves(allocation: StageAllocation, rng: random.Random) -> list[Callable[[_State], bool]]:
    """Each move edits a state in place and says whether it changed anything."""

    def exchange_skip(s: _State) -> bool:
        a, b = rng.sample(range(len(s.orders)), 2) if len(s.orders) > 1 else (0, 0)
        only_a = sorted(set(s.orders[a]) - set(s.orders[b]))
        only_b = sorted(set(s.orders[b]) - set(s.orders[a]))
        if not only_a or not only_b:
            return False
        x, y = rng.choice(only_a), rng.choice(only_b)
        agent_x, agent_y = s.agents.pop((a, x)), s.agents.pop((b, y))
        s.agents[(a, y)], s.agents[(b, x)] = agent_y, agent_x
        s.orders[a] = sorted(st if st != x else y for st in s.orders[a])
        s.orders[b] = sorted(st if st != y else x for st in s.orders[b])
        return True

    def move_replica(s: _State) -> bool:
        mb = rng.randrange(len(s.orders))
        stage = rng.choice([0, *s.orders[mb]])
        replicas = allocation.stages[stage].agents
        if len(replicas) < 2:
            return False
        s.agents[(mb, stage)] = rng.choice([a for a in replicas if a != s.agents[(mb, stage)]])
        return True

    def exchange_replica(s: _State) -> bool:
        stage = rng.randrange(allocation.num_stages)
        mbs = [mb for mb, o in enumerate(s.orders) if stage == 0 or stage in o]
        if len(mbs) < 2 or len(allocation.stages[stage].agents) < 2:
            return False
        a, b = rng.sample(mbs, 2)
        s.agents[(a, stage)], s.agents[(b, stage)] = s.agents[(b, stage)], s.agents[(a, stage)]
        return s.agents[(a, stage)] != s.agents[(b, stage)]

    def toggle_swap(s: _State) -> bool:
        mb = rng.randrange(len(s.orders))
        order = s.orders[mb]
        if len(order) < 2:
            return False
        i = rng.randrange(len(order) - 1)
        order[i], order[i + 1] = order[i + 1], order[i]
        return True

    return [exchange_skip, exchange_skip, move_replica, exchange_replica, toggle_swap]
