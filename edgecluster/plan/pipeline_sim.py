"""Discrete-event simulation of one synchronous training iteration.

Pure: (paths, stages, costs, cluster) -> SimResult. Each micro-batch runs a chain of
jobs along its path: `F` at its source (embed), `F` at each layer stage, `L` back at
its source (final norm, head, loss, and their backward), `B` at each layer stage in
reverse, and `B` at its source (embedding gradient). A job's time is its FLOPs over
its agent's GFLOP/s; between jobs on different agents the hidden state (or its
gradient) crosses their link: latency + bytes / bandwidth (links do not contend; a
send does not hold the sender). An agent runs one job at a time; jobs that arrive
while it is busy queue. Which queued job runs next is:

- `orders` given: exactly the agent's planned order (the executor's contract; an
  order that would wait forever is an error);
- else `policy` "backward-first" (L and B before F, then earliest arrival, then
  micro-batch id) or "forward-first" (F first, then micro-batch id), with at most
  `max_in_flight` micro-batches in flight per source (1F1B's bound) when given.

The processing order the run took is returned, so a plan stores it and replaying
it gives the same timeline. After its last backward a stage's replicas all-reduce
their gradients (ring: 2(r-1) steps of 1/r of the stage's fp32 gradients over the
slowest link among them); the iteration ends when the last stage has reduced.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from edgecluster.plan.cluster_file import ClusterSpec
from edgecluster.plan.pipeline_cost import FP32_BYTES, PipelineCosts
from edgecluster.plan.pipeline_paths import Hop, MicroBatchPath
from edgecluster.plan.pipeline_stages import StageAllocation

POLICIES = ("backward-first", "forward-first")


@dataclass(frozen=True, order=True)
class Action:
    """One job of one micro-batch at one stage: kind F (forward), L (loss) or B (backward)."""

    micro_batch: int
    kind: str
    stage: int

    def __str__(self) -> str:
        return f"{self.kind}{self.micro_batch}@{self.stage}"


class JobTime(NamedTuple):
    """When one job ran, and where."""

    action: Action
    agent: str
    start_s: float
    end_s: float


@dataclass(frozen=True, kw_only=True)
class SimResult:
    makespan_s: float  # last backward done
    iteration_s: float  # after the stages' gradient all-reduce
    allreduce_s: tuple[float, ...]  # per stage
    busy_fraction: Mapping[str, float]  # compute time / iteration time
    orders: Mapping[str, tuple[Action, ...]]
    jobs: tuple[JobTime, ...]


@dataclass(frozen=True)
class _Job:
    action: Action
    agent: str
    seconds: float
    send_s: float  # to reach the next job of the chain (0 after the last)
    priority: tuple[int, int]  # (kind rank, micro-batch) under the policy


Chain = tuple[_Job, ...]


def build_chain(
    path: MicroBatchPath,
    costs: PipelineCosts,
    allocation: StageAllocation,
    cluster: ClusterSpec,
    policy: str = "backward-first",
) -> Chain:
    """The jobs of one micro-batch along `path`, with their times and transfers."""
    speed = allocation.speeds_gflops
    mb, src = path.micro_batch, path.source
    steps = [("F", 0, src, costs.embed_forward_flops)]
    for hop in path.middle:
        n = allocation.stages[hop.stage].num_layers
        steps.append(("F", hop.stage, hop.agent, costs.stage_forward_flops(n)))
    steps.append(("L", 0, src, costs.loss_flops))
    for hop in reversed(path.middle):
        n = allocation.stages[hop.stage].num_layers
        steps.append(("B", hop.stage, hop.agent, costs.stage_backward_flops(n)))
    steps.append(("B", 0, src, costs.embed_forward_flops))
    jobs = []
    for i, (kind, stage, agent, flops) in enumerate(steps):
        nxt = steps[i + 1][2] if i + 1 < len(steps) else agent
        rank = int(kind == "F") if policy == "backward-first" else int(kind != "F")
        jobs.append(
            _Job(
                Action(mb, kind, stage),
                agent,
                flops / (speed[agent] * 1e9),
                cluster.transfer_s(agent, nxt, costs.activation_bytes),
                (rank, mb),
            )
        )
    return tuple(jobs)


def simulate(
    *,
    paths: Sequence[MicroBatchPath],
    allocation: StageAllocation,
    costs: PipelineCosts,
    cluster: ClusterSpec,
    policy: str = "backward-first",
    max_in_flight: int | None = None,
    orders: Mapping[str, Sequence[Action]] | None = None,
    chain_cache: dict[tuple[int, tuple[Hop, ...]], Chain] | None = None,
) -> SimResult:
    """One iteration of `paths`.

    `chain_cache` lets a search reuse the jobs of unchanged paths; keep one cache per
    policy, allocation and cluster.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    chains = []
    for path in paths:
        key = (path.micro_batch, path.hops)
        chain = chain_cache.get(key) if chain_cache is not None else None
        if chain is None:
            chain = build_chain(path, costs, allocation, cluster, policy)
            if chain_cache is not None:
                chain_cache[key] = chain
        chains.append(chain)
    run = _Run(chains, policy, max_in_flight, orders)
    run.go()
    return _result(run, allocation, costs, cluster)


class _Run:
    """The event loop: arrivals and completions in time order.

    An agent's ready jobs sit in a heap keyed by (kind rank, arrival or micro-batch,
    ...) so the policy's choice is its top.
    """

    def __init__(
        self,
        chains: list[Chain],
        policy: str,
        max_in_flight: int | None,
        orders: Mapping[str, Sequence[Action]] | None,
    ) -> None:
        self.chains, self.fifo = chains, policy == "backward-first"
        self.max_in_flight, self.orders = max_in_flight, orders
        self.events: list[tuple[float, int, int, int]] = []  # time, seq, micro-batch, job
        self.ready: dict[str, list[tuple[int, float, int, int]]] = {}  # heap per agent
        self.planned: dict[str, dict[Action, tuple[int, int]]] = {}  # orders mode
        self.busy: set[str] = set()
        self.done_order: dict[str, list[Action]] = {}
        self.in_flight: dict[str, int] = {}
        self.times: list[tuple[Action, str, float, float]] = []
        self.seq = 0
        self.next_index: dict[str, int] = {}

    def go(self) -> None:
        for mb in range(len(self.chains)):
            self._arrive(0.0, mb, 0)
        events = self.events
        while events:
            t, _, mb, j = heapq.heappop(events)
            if j >= 0:
                self._arrive(t, mb, j)
            else:
                self._finish(t, mb, -j - 1)
        stuck = [
            f"{a}: {self.chains[m][j].action}"
            for a, heap in self.ready.items()
            for *_, m, j in heap
        ] + [f"{a}: {act}" for a, waiting in self.planned.items() for act in waiting]
        if stuck:
            raise ValueError(f"the planned orders wait forever; never run: {', '.join(stuck)}")

    def _arrive(self, t: float, mb: int, j: int) -> None:
        job = self.chains[mb][j]
        if self.orders is not None:
            self.planned.setdefault(job.agent, {})[job.action] = (mb, j)
        else:
            rank, _ = job.priority
            key = t if self.fifo else float(mb)
            heapq.heappush(self.ready.setdefault(job.agent, []), (rank, key, mb, j))
        self._try_start(job.agent, t)

    def _finish(self, t: float, mb: int, j: int) -> None:
        job = self.chains[mb][j]
        self.busy.discard(job.agent)
        if j == len(self.chains[mb]) - 1:
            self.in_flight[job.agent] -= 1
        else:
            self.seq += 1
            heapq.heappush(self.events, (t + job.send_s, self.seq, mb, j + 1))
        self._try_start(job.agent, t)

    def _try_start(self, agent: str, t: float) -> None:
        if agent in self.busy:
            return
        choice = self._choose(agent)
        if choice is None:
            return
        mb, j = choice
        job = self.chains[mb][j]
        if j == 0:
            self.in_flight[agent] = self.in_flight.get(agent, 0) + 1
        self.done_order.setdefault(agent, []).append(job.action)
        self.times.append((job.action, agent, t, t + job.seconds))
        self.busy.add(agent)
        self.seq += 1
        heapq.heappush(self.events, (t + job.seconds, self.seq, mb, -j - 1))

    def _choose(self, agent: str) -> tuple[int, int] | None:
        if self.orders is not None:
            i = self.next_index.get(agent, 0)
            order = self.orders.get(agent, ())
            waiting = self.planned.get(agent, {})
            if i >= len(order) or order[i] not in waiting:
                return None
            self.next_index[agent] = i + 1
            return waiting.pop(order[i])
        heap = self.ready.get(agent)
        if not heap:
            return None
        if self.max_in_flight is not None and self.in_flight.get(agent, 0) >= self.max_in_flight:
            allowed = [item for item in heap if item[3] != 0]  # no new micro-batch
            if not allowed:
                return None
            item = min(allowed)
            heap.remove(item)
            heapq.heapify(heap)
        else:
            item = heapq.heappop(heap)
        return item[2], item[3]


def _result(
    run: _Run, allocation: StageAllocation, costs: PipelineCosts, cluster: ClusterSpec
) -> SimResult:
    times = [JobTime(*t) for t in run.times]
    makespan = max((jt.end_s for jt in times), default=0.0)
    stage_done = [0.0] * allocation.num_stages
    for jt in times:
        if jt.action.kind in ("B", "L"):
            stage_done[jt.action.stage] = max(stage_done[jt.action.stage], jt.end_s)
    allreduce = tuple(
        _ring_allreduce_s(s.agents, _stage_grad_bytes(s.index, s.num_layers, costs), cluster)
        for s in allocation.stages
    )
    iteration = max([makespan, *(d + r for d, r in zip(stage_done, allreduce, strict=True))])
    busy: dict[str, float] = {a: 0.0 for a in allocation.agents}
    for jt in times:
        busy[jt.agent] += jt.end_s - jt.start_s
    return SimResult(
        makespan_s=makespan,
        iteration_s=iteration,
        allreduce_s=allreduce,
        busy_fraction={a: (b / iteration if iteration > 0 else 0.0) for a, b in busy.items()},
        orders={a: tuple(run.done_order.get(a, ())) for a in allocation.agents},
        jobs=tuple(times),
    )


def _stage_grad_bytes(index: int, num_layers: int, costs: PipelineCosts) -> int:
    params = costs.stage0_params if index == 0 else num_layers * costs.layer_params
    return FP32_BYTES * params


def _ring_allreduce_s(agents: Sequence[str], num_bytes: int, cluster: ClusterSpec) -> float:
    r = len(agents)
    if r < 2:
        return 0.0
    ring = [cluster.link(agents[i], agents[(i + 1) % r]) for i in range(r)]
    step = max(link.transfer_s(num_bytes / r) for link in ring)
    return 2 * (r - 1) * step
