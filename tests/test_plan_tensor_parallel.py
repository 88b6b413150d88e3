"""plan_tensor_parallel: partitions, proportions, memory caps, streaming, errors."""

from __future__ import annotations

import dataclasses
import random

import pytest

from edgecluster.errors import PlanError
from edgecluster.model_config import ModelConfig
from edgecluster.plan.blocks import (
    full_model_layer_bytes,
    kv_cache_bytes,
    shard_block_bytes,
    shard_weight_bytes,
)
from edgecluster.plan.tensor_parallel import (
    ACTIVATION_SLACK_BYTES,
    AgentCapacity,
    AgentPlacement,
    TensorParallelPlan,
    plan_tensor_parallel,
)
from edgecluster.types import DeviceProfile, ShardSpec

MiB, GiB = 1024**2, 1024**3
RUNTIME = 300 * MiB

SMOLLM2 = ModelConfig(
    model_type="llama",
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    vocab_size=49152,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)
LLAMA_8B = ModelConfig(
    model_type="llama",
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    vocab_size=128256,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
)
QWEN_BIASED = dataclasses.replace(SMOLLM2, model_type="qwen2", attention_bias=True, mlp_bias=True)
SHAPES = {"smollm2": SMOLLM2, "llama8b": LLAMA_8B}
COUNTS = (1, 2, 3, 4, 5, 7, 12)


def agent(i: int, *, gflops: float = 10.0, memory: int = 64 * GiB) -> AgentCapacity:
    return AgentCapacity(
        node_id=f"node-{i}",
        name=f"dev{i}",
        matmul_gflops=gflops,
        memory_budget_bytes=memory,
        runtime_bytes=RUNTIME,
        disk_read_bytes_per_s=500e6,
    )


def room_of(a: AgentCapacity, cfg: ModelConfig, spec: ShardSpec, context: int = 2048) -> int:
    kv = kv_cache_bytes(
        cfg, num_kv_heads=spec.num_kv_heads, num_tokens=context, bytes_per_element=4
    )
    return a.memory_budget_bytes - a.runtime_bytes - ACTIVATION_SLACK_BYTES - kv


def assert_partition(plan: TensorParallelPlan, cfg: ModelConfig) -> None:
    heads: list[int] = []
    cols: list[int] = []
    for rank, p in enumerate(plan.placements, start=1):
        s = p.spec
        assert p.rank == rank
        heads += range(s.q_head_start, s.q_head_end)
        cols += range(s.mlp_col_start, s.mlp_col_end)
        groups = {h // cfg.group_size for h in range(s.q_head_start, s.q_head_end)}
        assert groups == set(range(s.kv_head_start, s.kv_head_end))
        assert p.weight_bytes == shard_weight_bytes(cfg, s, plan.storage_bytes_per_element)
    assert heads == list(range(cfg.num_heads))
    assert cols == list(range(cfg.intermediate_size))
    assert sum(p.spec.holds_output_bias for p in plan.placements) == 1


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", COUNTS)
def test_every_head_and_column_is_covered_once(shape: str, count: int) -> None:
    cfg = SHAPES[shape]
    plan = plan_tensor_parallel([agent(i) for i in range(count)], cfg)
    assert_partition(plan, cfg)
    assert not plan.streaming


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", COUNTS)
def test_uneven_capacities_still_partition(shape: str, count: int) -> None:
    cfg = SHAPES[shape]
    agents = [agent(i, gflops=1.0 + 7.3 * (i % 3)) for i in range(count)]
    assert_partition(plan_tensor_parallel(agents, cfg), cfg)


@pytest.mark.parametrize("count", [n for n in COUNTS if n <= 3])
def test_up_to_kv_heads_whole_groups_do_not_share_kv(count: int) -> None:
    plan = plan_tensor_parallel([agent(i) for i in range(count)], SMOLLM2)
    for p in plan.placements:
        assert p.spec.num_q_heads == p.spec.num_kv_heads * SMOLLM2.group_size
    kv = [h for p in plan.placements for h in range(p.spec.kv_head_start, p.spec.kv_head_end)]
    assert kv == list(range(SMOLLM2.num_kv_heads))


def test_more_agents_than_heads_leaves_some_without_attention() -> None:
    plan = plan_tensor_parallel([agent(i) for i in range(12)], SMOLLM2)
    empty = [p for p in plan.placements if p.spec.num_q_heads == 0]
    assert len(empty) == 3
    for p in empty:
        assert p.spec.num_kv_heads == 0 and p.spec.num_mlp_cols > 0
    assert_partition(plan, SMOLLM2)


def test_columns_follow_weights_three_to_one() -> None:
    plan = plan_tensor_parallel([agent(0), agent(1)], SMOLLM2, weights=[3, 1])
    first, second = (p.spec.num_mlp_cols for p in plan.placements)
    assert (first, second) == (1152, 384)


def test_shares_default_to_matmul_gflops() -> None:
    agents = [agent(0, gflops=10), agent(1, gflops=30), agent(2, gflops=60), agent(3, gflops=100)]
    plan = plan_tensor_parallel(agents, LLAMA_8B)
    # 5% 15% 30% 50%: of 14336 columns, and of 8 whole KV groups (4 agents <= 8 KV heads)
    assert [p.spec.num_mlp_cols for p in plan.placements] == [717, 2150, 4301, 7168]
    assert [p.spec.num_kv_heads for p in plan.placements] == [1, 1, 2, 4]
    assert [p.spec.num_q_heads for p in plan.placements] == [4, 4, 8, 16]


def test_zero_weight_agent_gets_nothing() -> None:
    plan = plan_tensor_parallel([agent(0), agent(1), agent(2)], SMOLLM2, weights=[1, 0, 1])
    middle = plan.placements[1]
    assert middle.spec.num_q_heads == middle.spec.num_mlp_cols == middle.weight_bytes == 0
    assert_partition(plan, SMOLLM2)


def test_output_bias_goes_to_first_agent_with_a_share() -> None:
    plan = plan_tensor_parallel([agent(0), agent(1), agent(2)], QWEN_BIASED, weights=[0, 2, 1])
    assert [p.spec.holds_output_bias for p in plan.placements] == [False, True, False]
    assert_partition(plan, QWEN_BIASED)


def test_memory_cap_is_respected_and_the_rest_water_fills() -> None:
    small = 2 * GiB  # room for about a tenth of Llama 8B in fp32
    agents = [agent(0, memory=small), agent(1), agent(2)]
    plan = plan_tensor_parallel(agents, LLAMA_8B)
    assert not plan.streaming
    capped, big1, big2 = plan.placements
    assert capped.weight_bytes <= room_of(agents[0], LLAMA_8B, capped.spec)
    assert capped.weight_bytes > 0.8 * room_of(agents[0], LLAMA_8B, capped.spec)  # filled, not idle
    assert abs(big1.spec.num_mlp_cols - big2.spec.num_mlp_cols) <= 1
    assert big1.spec.num_mlp_cols > 3 * capped.spec.num_mlp_cols
    assert_partition(plan, LLAMA_8B)


def test_every_agent_fits_its_room_when_the_cluster_fits() -> None:
    model = full_model_layer_bytes(LLAMA_8B, 4)
    memories = [model // 3, model // 2, model // 4, model // 5]
    agents = [agent(i, gflops=10 * (i + 1), memory=m + 3 * GiB) for i, m in enumerate(memories)]
    plan = plan_tensor_parallel(agents, LLAMA_8B, allow_streaming=False)
    for a, p in zip(agents, plan.placements, strict=True):
        assert p.weight_bytes <= room_of(a, LLAMA_8B, p.spec)
    assert_partition(plan, LLAMA_8B)


def test_agent_whose_runtime_exceeds_its_budget_gets_nothing() -> None:
    agents = [agent(0), agent(1, memory=RUNTIME // 2), agent(2)]
    for allow_streaming in (True, False):
        plan = plan_tensor_parallel(agents, SMOLLM2, allow_streaming=allow_streaming)
        starved = plan.placements[1]
        assert starved.weight_bytes == 0 and not starved.streaming
        assert_partition(plan, SMOLLM2)


def test_short_room_streams_with_a_window() -> None:
    agents = [agent(i, memory=500 * MiB) for i in range(3)]
    plan = plan_tensor_parallel(agents, SMOLLM2, kv_budget_tokens=256)
    assert plan.streaming
    for a, p in zip(agents, plan.placements, strict=True):
        room = room_of(a, SMOLLM2, p.spec, context=256)
        assert p.streaming == (p.weight_bytes > room)
        if p.streaming:
            attn, mlp = shard_block_bytes(SMOLLM2, p.spec, 4)
            blocks = sorted([attn, mlp] * SMOLLM2.num_layers, reverse=True)
            assert 2 <= p.window_blocks < len(blocks)
            assert sum(blocks[: p.window_blocks]) <= room < sum(blocks[: p.window_blocks + 1])
            assert p.expected_stall_s_per_token >= 0
    assert "streams, window" in plan.describe()
    assert_partition(plan, SMOLLM2)


@pytest.mark.parametrize("seed", range(4))
def test_random_clusters_keep_the_invariants(seed: int) -> None:
    """Partition always; streaming exactly when a shard passes its room; with
    allow_streaming=False either every shard fits or PlanError."""
    rng = random.Random(seed)
    for _ in range(50):
        cfg = rng.choice([SMOLLM2, LLAMA_8B, QWEN_BIASED])
        count, context = rng.randint(1, 14), rng.choice([16, 256, 2048])
        share = full_model_layer_bytes(cfg, 4) / count
        agents = [
            agent(
                i,
                gflops=rng.choice([0.5, 10, 37.5]),
                memory=int(RUNTIME + rng.uniform(0, 3) * share),
            )
            for i in range(count)
        ]
        allow = rng.random() < 0.5
        try:
            plan = plan_tensor_parallel(
                agents, cfg, kv_budget_tokens=context, allow_streaming=allow
            )
        except PlanError:
            continue
        assert_partition(plan, cfg)
        for a, p in zip(agents, plan.placements, strict=True):
            room = room_of(a, cfg, p.spec, context)
            assert p.streaming == (p.weight_bytes > max(0, room))
            assert allow or not p.streaming


def test_streaming_not_allowed_names_totals() -> None:
    agents = [agent(i, memory=500 * MiB) for i in range(3)]
    with pytest.raises(PlanError, match=r"does not fit: .* MiB but the agents have .* MiB"):
        plan_tensor_parallel(agents, SMOLLM2, kv_budget_tokens=256, allow_streaming=False)


def test_block_that_cannot_fit_twice_names_agent_and_sizes() -> None:
    agents = [agent(0, memory=RUNTIME + ACTIVATION_SLACK_BYTES + 40 * MiB)]
    with pytest.raises(PlanError) as err:
        plan_tensor_parallel(agents, LLAMA_8B, kv_budget_tokens=16)
    message = str(err.value)
    assert "dev0" in message and "node-0" in message
    assert "MiB of room" in message and "largest block" in message
    assert "--memory-limit" in message and "bf16" in message


def test_zero_agents_is_a_plan_error() -> None:
    with pytest.raises(PlanError, match="no agents alive; start `edge-agent join`"):
        plan_tensor_parallel([], SMOLLM2)


@pytest.mark.parametrize(
    ("weights", "match"),
    [([1.0], "1 weights for 2 agents"), ([1.0, -1.0], "finite, >= 0"), ([0.0, 0.0], "not all 0")],
)
def test_bad_weights_are_rejected(weights: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plan_tensor_parallel([agent(0), agent(1)], SMOLLM2, weights=weights)


def test_duplicate_node_ids_are_rejected() -> None:
    with pytest.raises(ValueError, match="distinct node ids"):
        plan_tensor_parallel([agent(0), agent(0)], SMOLLM2)


def test_capacity_validates_fields() -> None:
    with pytest.raises(ValueError, match="disk_read_bytes_per_s"):
        dataclasses.replace(agent(0), disk_read_bytes_per_s=0.0)
    with pytest.raises(ValueError, match="matmul_gflops"):
        dataclasses.replace(agent(0), matmul_gflops=-1.0)
    with pytest.raises(ValueError, match="runtime_bytes"):
        dataclasses.replace(agent(0), runtime_bytes=-1)


def test_capacity_from_profile_uses_the_budget() -> None:
    profile = DeviceProfile(
        cpu_count=4,
        memory_total_bytes=8 * GiB,
        memory_available_bytes=6 * GiB,
        disk_free_bytes=100 * GiB,
        disk_read_bytes_per_s=1e9,
        matmul_gflops=50.0,
        memory_limit_bytes=2 * GiB,
    )
    cap = AgentCapacity.from_profile(node_id="n", name="pi", profile=profile, runtime_bytes=RUNTIME)
    assert cap.memory_budget_bytes == 2 * GiB and cap.matmul_gflops == 50.0


def test_plan_rejects_gaps_and_two_bias_holders() -> None:
    plan = plan_tensor_parallel([agent(0), agent(1)], SMOLLM2)
    first, second = plan.placements
    gap = dataclasses.replace(second.spec, mlp_col_start=second.spec.mlp_col_start + 1)
    with pytest.raises(ValueError, match="MLP columns must be contiguous"):
        dataclasses.replace(plan, placements=(first, dataclasses.replace(second, spec=gap)))
    both = dataclasses.replace(second.spec, holds_output_bias=True)
    with pytest.raises(ValueError, match="exactly one agent"):
        dataclasses.replace(plan, placements=(first, dataclasses.replace(second, spec=both)))


def test_placement_rejects_a_window_of_one() -> None:
    plan = plan_tensor_parallel([agent(0)], SMOLLM2)
    with pytest.raises(ValueError, match="window of >= 2 blocks"):
        dataclasses.replace(plan.placements[0], streaming=True, window_blocks=1)
    assert isinstance(plan.placement_for("node-0"), AgentPlacement)


def test_describe_has_a_row_per_agent() -> None:
    text = plan_tensor_parallel([agent(i) for i in range(4)], SMOLLM2).describe()
    lines = text.splitlines()
    assert len(lines) == 6 and lines[0].split()[:2] == ["rank", "agent"]
    assert "dev3" in lines[4] and "+bias" in lines[1]


@pytest.mark.parametrize("count", [2, 3, 5, 7])
def test_int4_mlp_columns_are_whole_groups(count: int) -> None:
    """Every agent's down_proj columns are whole int4 groups of 32 (1536 = 48 x 32), so
    its matrices use the kernel's group; other modes split by single columns."""
    shares = [float(3 + (i * 5) % 7) for i in range(count)]
    agents = [agent(i) for i in range(count)]
    plan = plan_tensor_parallel(agents, SMOLLM2, weights=shares, weights_mode="int4")
    bounds = [(p.spec.mlp_col_start, p.spec.mlp_col_end) for p in plan.placements]
    assert all(start % 32 == 0 and end % 32 == 0 for start, end in bounds), bounds
    assert bounds[-1][1] == SMOLLM2.intermediate_size
    dense = plan_tensor_parallel(agents, SMOLLM2, weights=shares, weights_mode="int8")
    assert any(p.spec.mlp_col_end % 32 for p in dense.placements[:-1])


def test_int4_group_follows_a_model_whose_columns_are_not_multiples_of_32() -> None:
    odd = dataclasses.replace(SMOLLM2, intermediate_size=1000)  # 1000 = 50 x 20
    plan = plan_tensor_parallel(
        [agent(i) for i in range(3)], odd, weights=[1.0, 2.0, 4.0], weights_mode="int4"
    )
    assert all(p.spec.mlp_col_end % 20 == 0 for p in plan.placements)


@pytest.mark.parametrize("mode", ["fp32", "bf16", "int8", "int4"])
def test_planned_bytes_are_the_stored_bytes(mode: str) -> None:
    """The planner's block sizes equal what slicing stores, per mode; quantized shards
    take their packed size (int8 ~1/4, int4 ~3/16 of fp32 with its scales)."""
    import torch

    from edgecluster.weights.slicing import block_bytes

    dense = {"bf16": torch.bfloat16}.get(mode, torch.float32)
    plan = plan_tensor_parallel(
        [agent(i) for i in range(3)],
        QWEN_BIASED,
        weights=[1.0, 2.0, 3.0],
        weights_mode=mode,
        storage_bytes_per_element=dense.itemsize,
    )
    for p in plan.placements:
        attn, mlp = shard_block_bytes(QWEN_BIASED, p.spec, dense.itemsize, mode)
        assert attn == block_bytes(QWEN_BIASED, p.spec, "attn", dense, mode)
        assert mlp == block_bytes(QWEN_BIASED, p.spec, "mlp", dense, mode)
        assert p.weight_bytes == QWEN_BIASED.num_layers * (attn + mlp)
    fp32 = shard_weight_bytes(QWEN_BIASED, plan.placements[0].spec, 4)
    ratio = plan.placements[0].weight_bytes / fp32
    want = {"fp32": (1.0, 1.0), "bf16": (0.5, 0.5), "int8": (0.25, 0.27), "int4": (0.18, 0.2)}
    assert want[mode][0] <= ratio <= want[mode][1], ratio


def test_quantized_weights_fit_where_fp32_streams() -> None:
    """An agent whose memory holds the int8 shard but not the fp32 one stays resident."""
    fp32_bytes = full_model_layer_bytes(SMOLLM2, 4)
    memory = RUNTIME + ACTIVATION_SLACK_BYTES + fp32_bytes // 2 + 200 * MiB
    agents = [agent(0, memory=memory)]
    assert plan_tensor_parallel(agents, SMOLLM2, kv_budget_tokens=256).streaming
    quantized = plan_tensor_parallel(agents, SMOLLM2, kv_budget_tokens=256, weights_mode="int8")
    assert not quantized.streaming
    assert "stored as int8" in quantized.describe()
