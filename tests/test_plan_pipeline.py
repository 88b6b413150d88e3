"""Pipeline training planner: stage allocation, SkipPipe path rules, simulator, search.

Pure tests, no sockets. The rules are checked here independently of
`check_paths`, on random clusters (Hypothesis), and the simulator against a
timeline computed by hand.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgecluster.errors import PlanError
from edgecluster.model_config import ModelConfig
from edgecluster.plan.cluster_file import ClusterSpec, parse_cluster
from edgecluster.plan.pipeline import (
    SCHEDULES,
    PipelineOptions,
    PipelinePlan,
    compare_schedules,
    plan_pipeline,
)
from edgecluster.plan.pipeline_cost import TRAINING_BYTES_PER_PARAM, PipelineCosts
from edgecluster.plan.pipeline_describe import describe_plan, plan_to_dict
from edgecluster.plan.pipeline_paths import Hop, MicroBatchPath
from edgecluster.plan.pipeline_sim import simulate
from edgecluster.plan.pipeline_stages import Stage, StageAllocation

SMOLLM2_LIKE = ModelConfig(
    model_type="llama", hidden_size=576, intermediate_size=1536, num_layers=30,
    num_heads=9, num_kv_heads=3, head_dim=64, vocab_size=49152, rms_norm_eps=1e-5,
    rope_theta=100000.0, tie_word_embeddings=True,
)  # fmt: skip


def small_model(num_layers: int, vocab: int = 256) -> ModelConfig:
    return ModelConfig(
        model_type="llama", hidden_size=128, intermediate_size=384, num_layers=num_layers,
        num_heads=4, num_kv_heads=2, head_dim=32, vocab_size=vocab, rms_norm_eps=1e-5,
        rope_theta=10000.0,
    )  # fmt: skip


def make_cluster(
    speeds: list[float], *, seed: int = 0, memory: str = "4GiB", uneven_links: bool = True
) -> ClusterSpec:
    rng = random.Random(seed)
    names = [f"d{i}" for i in range(len(speeds))]
    links = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if uneven_links and rng.random() < 0.5:
                latency, bandwidth = rng.choice([1, 10, 40]), rng.choice([10, 50, 200])
                links.append(
                    {"from": a, "to": b, "latency_ms": latency, "bandwidth_mb_s": bandwidth}
                )
    devices = [
        {"name": n, "gflops": s, "memory": memory, "cpu_quota": 1, "disk_read_mb_s": 100}
        for n, s in zip(names, speeds, strict=True)
    ]
    return parse_cluster(
        {
            "devices": devices,
            "default_link": {"latency_ms": 2, "bandwidth_mb_s": 100},
            "links": links,
        }
    )


def swaps_from_sorted(order: list[int]) -> int | None:
    """Disjoint neighbour swaps from ascending order, counted independently of the planner."""
    target = sorted(order)
    swaps, i = 0, 0
    while i < len(order):
        if order[i] == target[i]:
            i += 1
        elif i + 1 < len(order) and order[i] == target[i + 1] and order[i + 1] == target[i]:
            swaps, i = swaps + 1, i + 2
        else:
            return None
    return swaps


def assert_rules_hold(plan: PipelinePlan, cluster: ClusterSpec) -> None:
    a, o = plan.allocation, plan.options
    others = a.num_stages - 1
    # stages: 0 has no layer, 1..S-1 cover every layer once, in order
    assert a.stages[0].num_layers == 0
    covered = [layer for s in a.stages[1:] for layer in range(s.layer_start, s.layer_end)]
    assert covered == list(range(plan.costs.num_layers))
    # memory: weights + grads + AdamW + the micro-batches an agent may hold
    for agent in a.agents:
        held = [s for s in a.stages if agent in s.agents]
        params = sum(
            plan.costs.stage0_param_bytes
            if s.index == 0
            else s.num_layers * plan.costs.layer_param_bytes
            for s in held
        )
        saved = sum(
            plan.costs.head_saved_bytes
            if s.index == 0
            else s.num_layers * plan.costs.layer_saved_bytes
            for s in held
        )
        need = o.runtime_bytes + params + a.memory_slots[agent] * saved
        assert a.memory_slots[agent] >= 1 and need <= cluster.device(agent).memory_bytes
    # paths
    skipping = o.schedule in ("skippipe", "random-skip")
    length = max(1, round(others * (1 - o.skip_ratio))) if skipping else others
    visits: Counter[int] = Counter()
    held_by: dict[str, set[int]] = {}
    assert [p.micro_batch for p in plan.paths] == list(range(o.num_micro_batches))
    for path in plan.paths:
        assert path.hops[0] == path.hops[-1] and path.hops[0].stage == 0
        middle = [h.stage for h in path.middle]
        assert len(middle) == length and len(set(middle)) == length and 0 not in middle
        swaps = swaps_from_sorted(middle)
        assert swaps is not None and swaps <= (o.max_swaps if o.schedule == "skippipe" else 0)
        for hop in path.hops:
            assert hop.agent in a.stages[hop.stage].agents
            held_by.setdefault(hop.agent, set()).add(path.micro_batch)
        visits.update(middle)
    assert len({visits[k] for k in range(1, a.num_stages)}) == 1  # equal skip fraction
    for agent, mbs in held_by.items():
        assert len(mbs) <= a.memory_slots[agent]
    # orders: each agent runs exactly the jobs its hops give it
    expected: dict[str, Counter[str]] = {agent: Counter() for agent in a.agents}
    for path in plan.paths:
        src, mb = path.source, path.micro_batch
        expected[src].update([f"F{mb}@0", f"L{mb}@0", f"B{mb}@0"])
        for hop in path.middle:
            expected[hop.agent].update([f"F{mb}@{hop.stage}", f"B{mb}@{hop.stage}"])
    for agent in a.agents:
        assert Counter(str(x) for x in plan.orders[agent]) == expected[agent]


def assert_timeline_sound(plan: PipelinePlan, cluster: ClusterSpec) -> None:
    """One job at a time per agent; each job starts after its input can have arrived."""
    jobs = plan.simulation.jobs
    by_agent: dict[str, list[Any]] = {}
    for job in jobs:
        by_agent.setdefault(job.agent, []).append(job)
    for runs in by_agent.values():
        runs.sort(key=lambda j: j.start_s)
        for before, after in zip(runs, runs[1:], strict=False):
            assert after.start_s >= before.end_s - 1e-9
    end = {(j.action.micro_batch, str(j.action)): j for j in jobs}
    for path in plan.paths:
        mb, chain = path.micro_batch, []
        chain.append(f"F{mb}@0")
        chain += [f"F{mb}@{h.stage}" for h in path.middle]
        chain.append(f"L{mb}@0")
        chain += [f"B{mb}@{h.stage}" for h in reversed(path.middle)]
        chain.append(f"B{mb}@0")
        for first, second in zip(chain, chain[1:], strict=False):
            j1, j2 = end[(mb, first)], end[(mb, second)]
            gap = cluster.transfer_s(j1.agent, j2.agent, plan.costs.activation_bytes)
            assert j2.start_s >= j1.end_s + gap - 1e-9


clusters = st.lists(st.sampled_from([5.0, 10.0, 20.0, 40.0, 80.0]), min_size=1, max_size=10)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    speeds=clusters,
    num_layers=st.integers(2, 12),
    schedule=st.sampled_from(SCHEDULES),
    skip_ratio=st.sampled_from([0.25, 0.33, 0.5]),
    max_swaps=st.integers(0, 2),
    num_micro_batches=st.integers(1, 12),
    max_slots=st.sampled_from([None, 4, 12]),
    num_stages=st.one_of(st.none(), st.integers(2, 8)),
    seed=st.integers(0, 3),
)
def test_plans_keep_every_rule_on_random_clusters(
    speeds: list[float],
    num_layers: int,
    schedule: str,
    skip_ratio: float,
    max_swaps: int,
    num_micro_batches: int,
    max_slots: int | None,
    num_stages: int | None,
    seed: int,
) -> None:
    cluster = make_cluster(speeds, seed=seed)
    options = PipelineOptions(
        schedule=schedule, skip_ratio=skip_ratio, max_swaps=max_swaps,
        num_micro_batches=num_micro_batches, seq_len=32, seed=seed, max_memory_slots=max_slots,
        num_stages=num_stages, search_evaluations=20,
    )  # fmt: skip
    try:
        plan = plan_pipeline(cluster, small_model(num_layers), options)
    except PlanError as exc:  # the only refusals: unequal visits, memory slots, too many stages
        assert any(why in str(exc) for why in ("equally", "memory slot", "does not fit")), exc
        return
    if num_stages is not None:
        assert plan.allocation.num_stages == num_stages
    assert_rules_hold(plan, cluster)
    assert_timeline_sound(plan, cluster)
    replay = simulate(
        paths=plan.paths, allocation=plan.allocation, costs=plan.costs, cluster=cluster,
        orders=plan.orders,
    )  # fmt: skip
    assert replay.iteration_s == pytest.approx(plan.iteration_s)  # the orders are the plan
    if schedule == "skippipe":  # the search starts from random-skip's paths: never worse
        rival = plan_pipeline(
            cluster, small_model(num_layers), replace(options, schedule="random-skip"),
            allocation=plan.allocation,
        )  # fmt: skip
        assert plan.iteration_s <= rival.iteration_s + 1e-12


def hand_costs() -> PipelineCosts:
    """Round numbers: on 1 GFLOP/s an embed takes 0.1 s, a layer 1 s, the loss 1.5 s."""
    return PipelineCosts(
        num_layers=1, layer_forward_flops=1e9, embed_forward_flops=1e8, head_forward_flops=5e8,
        activation_bytes=1_000_000, layer_param_bytes=TRAINING_BYTES_PER_PARAM * 1000,
        stage0_param_bytes=TRAINING_BYTES_PER_PARAM * 1000, layer_saved_bytes=1000,
        head_saved_bytes=1000, layer_params=1000, stage0_params=1000,
    )  # fmt: skip


def test_simulator_matches_a_hand_computed_two_stage_timeline() -> None:
    cluster = parse_cluster(
        {
            "devices": [
                {"name": n, "gflops": 1, "memory": "1GiB", "cpu_quota": 1, "disk_read_mb_s": 1}
                for n in ("a", "b")
            ],
            "default_link": {"latency_ms": 100, "bandwidth_mb_s": 10},  # 1 MB: 0.2 s
        }
    )
    allocation = StageAllocation(
        stages=(
            Stage(index=0, layer_start=0, layer_end=0, agents=("a",)),
            Stage(index=1, layer_start=0, layer_end=1, agents=("b",)),
        ),
        memory_slots={"a": 2, "b": 2},
        speeds_gflops={"a": 1.0, "b": 1.0},
    )
    paths = [
        MicroBatchPath(micro_batch=m, hops=(Hop(0, "a"), Hop(1, "b"), Hop(0, "a")))
        for m in range(2)
    ]
    sim = simulate(
        paths=paths, allocation=allocation, costs=hand_costs(), cluster=cluster,
        policy="forward-first",
    )  # fmt: skip
    timeline = {str(j.action): (round(j.start_s, 6), round(j.end_s, 6)) for j in sim.jobs}
    assert timeline == {
        "F0@0": (0.0, 0.1), "F1@0": (0.1, 0.2),  # embed both
        "F0@1": (0.3, 1.3), "F1@1": (1.3, 2.3),  # mb 1 arrives at 0.4 and queues
        "L0@0": (1.5, 3.0), "L1@0": (3.0, 4.5),  # mb 1 back at 2.5 and queues
        "B0@1": (3.2, 5.2), "B1@1": (5.2, 7.2),  # grads arrive at 3.2 and 4.7
        "B0@0": (5.4, 5.5), "B1@0": (7.4, 7.5),
    }  # fmt: skip
    assert sim.makespan_s == pytest.approx(7.5) and sim.iteration_s == pytest.approx(7.5)
    assert sim.busy_fraction["a"] == pytest.approx(3.4 / 7.5)
    assert sim.busy_fraction["b"] == pytest.approx(6.0 / 7.5)
    assert [str(x) for x in sim.orders["b"]] == ["F0@1", "F1@1", "B0@1", "B1@1"]


def test_replicas_add_the_ring_allreduce_after_their_last_backward() -> None:
    cluster = make_cluster([10.0, 10.0, 10.0], uneven_links=False)
    allocation = StageAllocation(
        stages=(
            Stage(index=0, layer_start=0, layer_end=0, agents=("d0",)),
            Stage(index=1, layer_start=0, layer_end=1, agents=("d1", "d2")),
        ),
        memory_slots={"d0": 4, "d1": 4, "d2": 4},
        speeds_gflops={"d0": 10.0, "d1": 10.0, "d2": 10.0},
    )
    paths = [
        MicroBatchPath(micro_batch=m, hops=(Hop(0, "d0"), Hop(1, f"d{1 + m}"), Hop(0, "d0")))
        for m in range(2)
    ]
    sim = simulate(paths=paths, allocation=allocation, costs=hand_costs(), cluster=cluster)
    # 2 replicas: 2 steps of half of 1000 fp32 gradients over 2 ms + 100 MB/s
    assert sim.allreduce_s == pytest.approx((0.0, 2 * (0.002 + 2000 / 100e6)))
    last_b1 = max(
        j.end_s for j in sim.jobs if str(j.action).startswith("B") and j.action.stage == 1
    )
    assert sim.iteration_s == pytest.approx(max(sim.makespan_s, last_b1 + sim.allreduce_s[1]))


UNEVEN_8 = [80.0, 60.0, 40.0, 40.0, 20.0, 20.0, 10.0, 10.0]


def test_skippipe_beats_random_skip_and_gpipe_on_an_uneven_8_agent_cluster() -> None:
    cluster = make_cluster(UNEVEN_8, seed=3)
    options = PipelineOptions(num_micro_batches=12, seq_len=128, skip_ratio=0.33)
    plans = compare_schedules(cluster, SMOLLM2_LIKE, options)
    times = {name: plan.iteration_s for name, plan in plans.items()}
    assert times["skippipe"] < times["random-skip"] < times["gpipe"], times
    assert plans["skippipe"].allocation == plans["gpipe"].allocation  # equal terms
    assert_rules_hold(plans["skippipe"], cluster)
    text = describe_plan(plans["skippipe"], plans)
    for needle in ("Stages", "embedding, head, loss", "mb 11", "Agent orders", "random-skip"):
        assert needle in text
    assert "vs gpipe" in text and "skippipe" in text
    view = json.loads(json.dumps(plan_to_dict(plans["skippipe"])))
    assert view["paths"][0][0] == view["paths"][0][-1] and view["paths"][0][0][0] == 0
    assert view["simulated"]["iteration_s"] == pytest.approx(times["skippipe"])
    assert sum(len(o) for o in view["orders"].values()) == len(plans["skippipe"].simulation.jobs)


def test_a_20_agent_plan_is_found_in_seconds() -> None:
    speeds = [random.Random(i).choice([10.0, 20.0, 40.0, 80.0]) for i in range(20)]
    cluster = make_cluster(speeds, seed=7)
    started = time.monotonic()
    plan = plan_pipeline(cluster, SMOLLM2_LIKE, PipelineOptions(num_micro_batches=24, seq_len=128))
    assert time.monotonic() - started < 60  # generous: the search stops itself after ~3 s
    assert len(plan.allocation.agents) == 20
    assert_rules_hold(plan, cluster)


def test_one_agent_holds_every_stage() -> None:
    cluster = make_cluster([10.0])
    plan = plan_pipeline(
        cluster, small_model(4), PipelineOptions(schedule="gpipe", num_stages=3, seq_len=32)
    )
    assert [s.agents for s in plan.allocation.stages] == [("d0",)] * 3
    assert plan.simulation.busy_fraction["d0"] == pytest.approx(1.0)  # no link to wait on
    assert_rules_hold(plan, cluster)


def test_bad_options_and_impossible_plans_say_how_to_fix_them() -> None:
    with pytest.raises(ValueError, match="--schedule 'pipedream' is unknown"):
        PipelineOptions(schedule="pipedream")
    with pytest.raises(ValueError, match="--skip-ratio must be in"):
        PipelineOptions(skip_ratio=1.0)
    with pytest.raises(ValueError, match="--micro-batches must be >= 1"):
        PipelineOptions(num_micro_batches=0)
    cluster = make_cluster([10.0, 10.0, 10.0, 10.0])
    with pytest.raises(PlanError, match="--stages 9 does not fit a model of 4 layers"):
        plan_pipeline(cluster, small_model(4), PipelineOptions(num_stages=9))
    with pytest.raises(PlanError, match="use a multiple of 3 micro-batches"):
        plan_pipeline(  # 4 micro-batches x 2 of 3 stages = 8 visits over 3 stages
            cluster, small_model(4), PipelineOptions(num_stages=4, num_micro_batches=4)
        )
    tiny = make_cluster([10.0, 10.0], memory="300MiB")
    with pytest.raises(PlanError, match="agent d.* cannot hold stage"):
        plan_pipeline(tiny, SMOLLM2_LIKE, PipelineOptions(schedule="gpipe"))
