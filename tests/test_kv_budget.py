"""KV memory: the cache grows by whole blocks and frees with the sequence, optionally in
bf16; the planner reserves the KV budget, not a context per agent; the scheduler admits
only what the budget holds and refuses what never fits, naming the knobs."""

from __future__ import annotations

import pytest
import torch

from edgecluster.api.backend import SamplingParams
from edgecluster.api.errors import ApiError
from edgecluster.engine.kv_cache import KV_BLOCK_TOKENS, KVCache, kv_blocks_tokens
from edgecluster.errors import PlanError
from edgecluster.plan.blocks import kv_cache_bytes
from edgecluster.plan.tensor_parallel import (
    AgentCapacity,
    plan_tensor_parallel,
    plan_within_kv_budget,
)
from edgecluster.runtime.agent_session import MemoryPolicy, choose_agent_window
from edgecluster.runtime.scheduler import GenRequest, Scheduler
from tests.test_plan_tensor_parallel import SMOLLM2

MiB = 1 << 20
KNOBS = ("--memory-limit", "add agents", "--kv-budget", "--max-context", "--kv-dtype bfloat16")


def test_cache_grows_by_whole_blocks_and_frees_with_the_sequence() -> None:
    cache = KVCache(2, 3, 8, torch.float32)
    k = torch.randn(3, 5, 8)
    keys, values = cache.update(7, 0, 0, k, k * 2)
    assert torch.equal(keys, k) and torch.equal(values, k * 2)
    per_block = 2 * 3 * KV_BLOCK_TOKENS * 8 * 4  # keys + values of one layer
    assert cache.bytes_used() == per_block  # only layer 0 has grown
    cache.update(7, 1, 0, k, k)
    assert cache.bytes_used() == 2 * per_block
    for position in range(5, KV_BLOCK_TOKENS + 1):  # decode across a block boundary
        one = torch.full((3, 1, 8), float(position))
        keys, _ = cache.update(7, 0, position, one, one)
    assert keys.shape == (3, KV_BLOCK_TOKENS + 1, 8)
    assert torch.equal(keys[:, :5], k) and float(keys[0, -1, 0]) == KV_BLOCK_TOKENS
    assert cache.bytes_used() == 3 * per_block
    cache.update(8, 0, 0, k, k)
    assert cache.num_sequences == 2
    cache.free(7)
    assert cache.num_sequences == 1 and cache.bytes_used() == per_block


def test_bf16_cache_halves_memory_and_answers_in_compute_dtype() -> None:
    full = KVCache(1, 2, 16, torch.float32)
    half = KVCache(1, 2, 16, torch.bfloat16, compute_dtype=torch.float32)
    k = torch.randn(2, 10, 16)
    want, _ = full.update(1, 0, 0, k, k)
    got, _ = half.update(1, 0, 0, k, k)
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=1e-2, atol=1e-2)
    assert half.bytes_used() * 2 == full.bytes_used()


def test_blocks_round_up() -> None:
    assert kv_blocks_tokens(0) == 0
    assert kv_blocks_tokens(1) == KV_BLOCK_TOKENS
    assert kv_blocks_tokens(KV_BLOCK_TOKENS + 1) == 2 * KV_BLOCK_TOKENS


def _agent(memory: int) -> AgentCapacity:
    return AgentCapacity(
        node_id="n0",
        name="tight",
        matmul_gflops=10.0,
        memory_budget_bytes=memory,
        runtime_bytes=250 * MiB,
        disk_read_bytes_per_s=500e6,
    )


def test_plan_reserves_the_budget_at_the_kv_dtype() -> None:
    roomy = [_agent(4096 * MiB)]
    small = plan_tensor_parallel(roomy, SMOLLM2, kv_budget_tokens=256)
    assert small.kv_budget_tokens == 256 and "KV budget 256 tokens" in small.describe()
    want = kv_cache_bytes(SMOLLM2, num_kv_heads=3, num_tokens=2048, bytes_per_element=2)
    assert want == kv_cache_bytes(SMOLLM2, num_kv_heads=3, num_tokens=1024, bytes_per_element=4)
    # an agent with room for the weights and 1024 fp32 tokens, but not 2048
    weights = small.placements[0].weight_bytes
    kv_1024 = kv_cache_bytes(SMOLLM2, num_kv_heads=3, num_tokens=1024, bytes_per_element=4)
    agent = _agent(250 * MiB + 64 * MiB + weights + kv_1024 + MiB)
    fp32 = plan_tensor_parallel([agent], SMOLLM2, kv_budget_tokens=2048)
    bf16 = plan_tensor_parallel([agent], SMOLLM2, kv_budget_tokens=2048, kv_bytes_per_element=2)
    assert fp32.placements[0].streaming and not bf16.placements[0].streaming


def test_auto_budget_halves_until_the_tightest_agent_fits_and_a_fixed_one_refuses() -> None:
    agent = _agent(400 * MiB)
    with pytest.raises(PlanError) as err:
        plan_within_kv_budget([agent], SMOLLM2, kv_budget_tokens=4096, fixed_budget=True)
    for knob in KNOBS:
        assert knob in str(err.value), knob
    plan = plan_within_kv_budget([agent], SMOLLM2, kv_budget_tokens=4096, fixed_budget=False)
    assert 256 <= plan.kv_budget_tokens < 4096 and plan.placements[0].streaming


def test_agent_refusal_names_every_knob() -> None:
    tiny = MemoryPolicy(limit_bytes=330 * MiB)
    with pytest.raises(PlanError) as err:
        choose_agent_window(
            tiny, [40 * MiB] * 8, expand=1, fixed_bytes=300 * MiB, plan_hint=0, agent="a"
        )
    for knob in KNOBS:
        assert knob in str(err.value), knob


def _request(prompt: int, max_tokens: int, seen: list) -> GenRequest:
    return GenRequest(
        prompt_ids=[1] * prompt,
        params=SamplingParams(max_tokens=max_tokens),
        eos_ids=frozenset(),
        emit=lambda token, error: seen.append(error),
    )


class _AcceptsAnyTokens:
    """A hub whose vocabulary and context take every request (admission is what is tested)."""

    def check_tokens(self, token_ids: list[int], start: int = 0, more: int = 0) -> None:
        pass


_ANY_TOKENS = _AcceptsAnyTokens()


def test_admission_queues_beyond_the_budget_and_refuses_what_never_fits() -> None:
    scheduler = Scheduler()  # no session attached: its loop never admits on its own
    try:
        scheduler.kv_budget_tokens = 4 * KV_BLOCK_TOKENS
        seen: list = []
        huge = _request(3 * KV_BLOCK_TOKENS, 2 * KV_BLOCK_TOKENS, seen)
        with pytest.raises(ApiError) as err:
            scheduler.check_fits(huge)
        assert err.value.status == 400
        for knob in (*KNOBS, "max_tokens"):
            assert knob in err.value.message, knob
        first = scheduler.submit(_request(KV_BLOCK_TOKENS, KV_BLOCK_TOKENS, seen))  # 2 blocks
        second = scheduler.submit(_request(10, 10, seen))  # 1 block
        third = scheduler.submit(_request(10, KV_BLOCK_TOKENS, seen))  # 2 blocks: waits
        fourth = scheduler.submit(_request(1, 1, seen))  # fits, but waits its turn
        with scheduler._cond:
            scheduler._admit(_ANY_TOKENS)  # type: ignore[arg-type]
            assert scheduler._active == [first, second]
            assert scheduler._waiting == [third, fourth]
            scheduler._active.remove(first)  # retired: its blocks are free again
            scheduler.kv_budget_tokens = 3 * KV_BLOCK_TOKENS
            scheduler._admit(_ANY_TOKENS)  # type: ignore[arg-type]
            assert scheduler._active == [second, third]
            scheduler.kv_budget_tokens = KV_BLOCK_TOKENS  # a re-plan shrank the budget
            scheduler._active.clear()
            scheduler._waiting.insert(0, huge)
            scheduler._admit(_ANY_TOKENS)  # type: ignore[arg-type]
        assert isinstance(seen[0], ApiError) and seen[0].status == 400
        assert scheduler._active == [fourth]
    finally:
        scheduler.stop()
