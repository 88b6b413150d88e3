"""Pipeline training plans: stages, micro-batch paths, per-agent orders, predicted time.

Pure: (cluster, model config, options) -> PipelinePlan; no I/O, no sockets. Every
schedule is a plan of the same type, run by the same executor and scored by the
same simulator (pipeline_sim.py), so they compare on equal terms:

- gpipe: every micro-batch through every stage; an agent runs forwards first;
- 1f1b: every stage; backward first, at most S micro-batches in flight per source;
- random-skip: paths skip `skip_ratio` of the layer stages at random (every stage
  still visited equally often), no swaps; backward first;
- skippipe: the same path rules plus up to `max_swaps` neighbour swaps, the paths
  chosen by search (pipeline_search.py) to shorten the simulated iteration.

A plan's `orders` (per agent, its actions in order) are the contract with the
executor: an agent runs exactly that list. `compare_schedules` plans every schedule
on one stage allocation (skippipe's) for `--dry-run` and the benchmark.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

from edgecluster.errors import PlanError
from edgecluster.model_config import ModelConfig
from edgecluster.plan.cluster_file import ClusterSpec
from edgecluster.plan.pipeline_cost import PipelineCosts, pipeline_costs
from edgecluster.plan.pipeline_paths import (
    MicroBatchPath,
    PathRules,
    check_paths,
    full_paths,
    path_stage_count,
    random_skip_paths,
    visits_per_stage,
)
from edgecluster.plan.pipeline_search import search_skip_paths
from edgecluster.plan.pipeline_sim import Action, SimResult, simulate
from edgecluster.plan.pipeline_stages import RUNTIME_BYTES, StageAllocation, allocate_stages

SCHEDULES = ("skippipe", "gpipe", "1f1b", "random-skip")
SKIPPING = ("skippipe", "random-skip")
STAGE_COUNT_EVALUATIONS = 40  # skippipe: search steps per candidate stage count


@dataclass(frozen=True, kw_only=True)
class PipelineOptions:
    schedule: str = "skippipe"
    num_stages: int | None = None  # None: chosen from the cluster
    skip_ratio: float = 0.33  # skippipe and random-skip only
    max_swaps: int = 2  # skippipe only
    micro_batch_size: int = 1
    num_micro_batches: int = 8
    seq_len: int = 256
    seed: int = 0
    max_memory_slots: int | None = None
    runtime_bytes: int = RUNTIME_BYTES
    search_evaluations: int = 500
    search_time_budget_s: float = 3.0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"--schedule {self.schedule!r} is unknown; use one of {', '.join(SCHEDULES)}"
            )
        if not 0 <= self.skip_ratio < 1:
            raise ValueError(f"--skip-ratio must be in [0, 1), got {self.skip_ratio}")
        for name in ("micro_batch_size", "num_micro_batches", "seq_len"):
            if getattr(self, name) < 1:
                flag = name.replace("num_", "").replace("_size", "").replace("_", "-")
                raise ValueError(f"--{flag} must be >= 1, got {getattr(self, name)}")
        if self.max_swaps < 0:
            raise ValueError(f"--max-swaps must be >= 0, got {self.max_swaps}")
        if self.num_stages is not None and self.num_stages < 2:
            raise ValueError(
                f"--stages must be >= 2 (stage 0 and a layer stage), got {self.num_stages}"
            )
        if self.search_evaluations < 0 or self.search_time_budget_s < 0:
            raise ValueError("search_evaluations and search_time_budget_s must be >= 0")

    @property
    def visit_fraction(self) -> float:
        return 1 - self.skip_ratio if self.schedule in SKIPPING else 1.0

    def rules(self, num_stages: int) -> PathRules:
        skipping = self.schedule in SKIPPING
        return PathRules(
            num_micro_batches=self.num_micro_batches,
            path_stages=path_stage_count(num_stages, self.skip_ratio if skipping else 0.0),
            max_swaps=self.max_swaps if self.schedule == "skippipe" else 0,
        )


@dataclass(frozen=True, kw_only=True)
class PipelinePlan:
    schedule: str
    options: PipelineOptions
    costs: PipelineCosts
    allocation: StageAllocation
    paths: tuple[MicroBatchPath, ...]
    orders: Mapping[str, tuple[Action, ...]]  # the executor's per-agent action lists
    simulation: SimResult

    @property
    def iteration_s(self) -> float:
        return self.simulation.iteration_s


def allocate_for(
    cluster: ClusterSpec, model: ModelConfig, options: PipelineOptions
) -> StageAllocation:
    """The stage allocation `options` ask for.

    With `num_stages` None, every stage count from 2 up to one stage per agent (and
    per layer) that keeps the visits equal is allocated, and the one whose plan
    simulates fastest wins (full paths; random-skip; skippipe after a short search
    sharing `search_time_budget_s`): links, the replicas' all-reduce and stage 0's
    share all weigh in.
    """
    costs = _costs(model, options)
    if options.num_stages is not None:
        return _allocate(cluster, costs, options, options.num_stages)
    most = max(2, min(len(cluster.devices), costs.num_layers + 1))
    counts = [s for s in range(2, most + 1) if _visits_can_be_equal(options, s)]
    deadline = time.monotonic() + options.search_time_budget_s
    best: tuple[float, StageAllocation] | None = None
    error: PlanError | None = None
    for i, num_stages in enumerate(counts):
        budget_s = max(0.0, deadline - time.monotonic()) / (len(counts) - i)
        try:
            scored = _score_stage_count(cluster, costs, options, num_stages, budget_s)
        except PlanError as exc:
            error = exc
            continue
        if best is None or scored[0] < best[0]:
            best = scored
    if best is None:
        raise error or PlanError(
            f"{options.num_micro_batches} micro-batches cannot visit the layer stages equally "
            f"at any stage count; set --stages, --micro-batches or --skip-ratio"
        )
    return best[1]


def _visits_can_be_equal(options: PipelineOptions, num_stages: int) -> bool:
    rules = options.rules(num_stages)
    return rules.num_micro_batches * rules.path_stages % (num_stages - 1) == 0


def _score_stage_count(
    cluster: ClusterSpec,
    costs: PipelineCosts,
    options: PipelineOptions,
    num_stages: int,
    budget_s: float,
) -> tuple[float, StageAllocation]:
    """Simulated iteration of the schedule's quick plan on `num_stages` stages."""
    allocation = _allocate(cluster, costs, options, num_stages)
    rules = options.rules(num_stages)
    paths, policy, in_flight = _unsearched_paths(allocation, options, rules)
    if options.schedule == "skippipe":  # a short search tells stage counts apart
        paths = search_skip_paths(
            allocation=allocation, rules=rules, costs=costs, cluster=cluster, start=paths,
            seed=options.seed, time_budget_s=budget_s,
            max_evaluations=min(STAGE_COUNT_EVALUATIONS, options.search_evaluations),
        )  # fmt: skip
    sim = simulate(
        paths=paths, allocation=allocation, costs=costs, cluster=cluster, policy=policy,
        max_in_flight=in_flight,
    )  # fmt: skip
    return sim.iteration_s, allocation


def _allocate(
    cluster: ClusterSpec, costs: PipelineCosts, options: PipelineOptions, num_stages: int
) -> StageAllocation:
    return allocate_stages(
        cluster,
        costs,
        num_stages=num_stages,
        visit_fraction=options.visit_fraction,
        max_memory_slots=options.max_memory_slots,
        runtime_bytes=options.runtime_bytes,
    )


def _unsearched_paths(
    allocation: StageAllocation, options: PipelineOptions, rules: PathRules
) -> tuple[list[MicroBatchPath], str, int | None]:
    """Paths before any search, with the simulator policy and in-flight bound of the schedule."""
    visits_per_stage(allocation.num_stages, rules)
    if options.schedule == "gpipe":
        return full_paths(allocation, options.num_micro_batches), "forward-first", None
    if options.schedule == "1f1b":
        paths = full_paths(allocation, options.num_micro_batches)
        return paths, "backward-first", allocation.num_stages
    return random_skip_paths(allocation, rules, seed=options.seed), "backward-first", None


def plan_pipeline(
    cluster: ClusterSpec,
    model: ModelConfig,
    options: PipelineOptions,
    *,
    allocation: StageAllocation | None = None,
) -> PipelinePlan:
    """The plan of `options.schedule`, on `allocation` or on one made for it."""
    costs = _costs(model, options)
    if allocation is None:
        allocation = allocate_for(cluster, model, options)
    rules = options.rules(allocation.num_stages)
    paths, policy, in_flight = _unsearched_paths(allocation, options, rules)
    if options.schedule == "skippipe":
        paths = search_skip_paths(
            allocation=allocation,
            rules=rules,
            costs=costs,
            cluster=cluster,
            start=paths,
            seed=options.seed,
            max_evaluations=options.search_evaluations,
            time_budget_s=options.search_time_budget_s,
        )
    check_paths(paths, allocation, rules)
    sim = simulate(
        paths=paths,
        allocation=allocation,
        costs=costs,
        cluster=cluster,
        policy=policy,
        max_in_flight=in_flight,
    )
    return PipelinePlan(
        schedule=options.schedule,
        options=options,
        costs=costs,
        allocation=allocation,
        paths=tuple(paths),
        orders=sim.orders,
        simulation=sim,
    )


def compare_schedules(
    cluster: ClusterSpec, model: ModelConfig, options: PipelineOptions
) -> dict[str, PipelinePlan]:
    """Every schedule planned on the stage allocation of `options` (skip ratio and all)."""
    allocation = allocate_for(cluster, model, options)
    return {
        schedule: plan_pipeline(
            cluster, model, replace(options, schedule=schedule), allocation=allocation
        )
        for schedule in SCHEDULES
    }


def _costs(model: ModelConfig, options: PipelineOptions) -> PipelineCosts:
    return pipeline_costs(model, micro_batch_size=options.micro_batch_size, seq_len=options.seq_len)
