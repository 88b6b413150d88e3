"""Text and JSON views of a pipeline plan.

Pure. `describe_plan` is what `edge-coordinator train --dry-run` prints: stages with
their layers and agents; each micro-batch's path; each agent's processing order with
its memory slots and simulated busy fraction; the simulated iteration time of every
schedule, with its change against gpipe. `plan_to_dict` is the same plan as plain
JSON types (for `GET /v1/training` and `--log-json`): orders are lists of
[micro_batch, kind, stage], paths lists of [stage, agent].
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from edgecluster.plan.pipeline import PipelinePlan
from edgecluster.plan.pipeline_paths import MicroBatchPath


def describe_plan(plan: PipelinePlan, comparison: Mapping[str, PipelinePlan] | None = None) -> str:
    """The plan as text; `comparison` (from compare_schedules) adds the schedule table."""
    return "\n".join(
        [
            _header(plan),
            "",
            *_stages(plan),
            "",
            *_paths(plan),
            "",
            *_orders(plan),
            "",
            *_schedules(comparison or {plan.schedule: plan}),
        ]
    )


def _header(plan: PipelinePlan) -> str:
    o, a = plan.options, plan.allocation
    visited = len(plan.paths[0].middle) if plan.paths else 0
    text = (
        f"Plan: {plan.schedule}, {a.num_stages} stages over {len(a.agents)} "
        f"agent{'' if len(a.agents) == 1 else 's'}, "
        f"{o.num_micro_batches} micro-batches of {o.micro_batch_size} x {o.seq_len} tokens; "
        f"each path visits {visited} of {a.num_stages - 1} layer stages"
    )
    if plan.schedule == "skippipe":
        text += f" (skip ratio {o.skip_ratio:g}, at most {o.max_swaps} swaps)"
    elif plan.schedule == "random-skip":
        text += f" (skip ratio {o.skip_ratio:g}, no swaps)"
    return text


def _stages(plan: PipelinePlan) -> list[str]:
    lines = ["Stages", f"  {'stage':<6} {'layers':<22} agents"]
    for stage in plan.allocation.stages:
        if stage.index == 0:
            layers = "embedding, head, loss"
        else:
            layers = f"{stage.layer_start}..{stage.layer_end - 1} ({stage.num_layers})"
        lines.append(f"  {stage.index:<6} {layers:<22} {', '.join(stage.agents)}")
    return lines


def _path_text(path: MicroBatchPath) -> str:
    middle = " -> ".join(f"{h.stage}@{h.agent}" for h in path.middle)
    return f"0@{path.source} -> {middle} -> 0@{path.source}"


def _paths(plan: PipelinePlan) -> list[str]:
    lines = ["Paths (stage@agent)"]
    lines += [f"  mb {p.micro_batch:<4} {_path_text(p)}" for p in plan.paths]
    return lines


def _orders(plan: PipelinePlan) -> list[str]:
    lines = ["Agent orders (F forward, L loss, B backward; micro-batch@stage)"]
    sim = plan.simulation
    for agent in plan.allocation.agents:
        slots = plan.allocation.memory_slots[agent]
        busy = sim.busy_fraction.get(agent, 0.0)
        actions = " ".join(str(a) for a in plan.orders.get(agent, ()))
        lines.append(f"  {agent} (slots {slots}, busy {busy:.1%}): {actions}")
    return lines


def _schedules(plans: Mapping[str, PipelinePlan]) -> list[str]:
    lines = [
        "Simulated iteration",
        f"  {'schedule':<12} {'iteration':>10} {'pipeline':>10} {'vs gpipe':>9}",
    ]
    base = plans["gpipe"].iteration_s if "gpipe" in plans else None
    for name, plan in plans.items():
        sim = plan.simulation
        change = f"{(sim.iteration_s / base - 1):+.1%}" if base else ""
        lines.append(f"  {name:<12} {sim.iteration_s:>9.3f}s {sim.makespan_s:>9.3f}s {change:>9}")
    lines.append("  (pipeline: last backward done; iteration: after the replicas' all-reduce)")
    return lines


def plan_to_dict(plan: PipelinePlan) -> dict[str, Any]:
    """The plan in JSON types: options, stages, memory slots, paths, orders, simulation."""
    sim, a = plan.simulation, plan.allocation
    return {
        "schedule": plan.schedule,
        "options": asdict(plan.options),
        "stages": [
            {"index": s.index, "layers": [s.layer_start, s.layer_end], "agents": list(s.agents)}
            for s in a.stages
        ],
        "memory_slots": dict(a.memory_slots),
        "paths": [[[h.stage, h.agent] for h in p.hops] for p in plan.paths],
        "orders": {
            agent: [[x.micro_batch, x.kind, x.stage] for x in actions]
            for agent, actions in plan.orders.items()
        },
        "simulated": {
            "iteration_s": sim.iteration_s,
            "makespan_s": sim.makespan_s,
            "allreduce_s": list(sim.allreduce_s),
            "busy_fraction": dict(sim.busy_fraction),
        },
    }
