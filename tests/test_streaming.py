"""Disk-backed weight streaming: the window, and serving under a real memory limit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from edgecluster.device.emulated import DeviceLimits, EmulatedDevice, available
from edgecluster.runtime.agent_session import MemoryPolicy, choose_agent_window
from edgecluster.weights.safetensors_file import read_block_raw
from edgecluster.weights.streaming_store import StreamingWeights
from tests.parity_cluster import ParityCluster, greedy

MiB = 1 << 20


def _blocks(tmp_path: Path, count: int, dtype: torch.dtype) -> list[tuple[tuple[int, str], Path]]:
    order = []
    for i in range(count):
        path = tmp_path / f"block{i}.safetensors"
        save_file({"w": torch.randn(64 + i, 32).to(dtype), "b": torch.randn(7).to(dtype)}, path)
        order.append(((i // 2, "attn" if i % 2 == 0 else "mlp"), path))
    return order


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_window_streams_every_block_in_order_for_many_steps(tmp_path: Path, dtype) -> None:
    order = _blocks(tmp_path, 6, dtype)
    stream = StreamingWeights(order, window=3, dtype=torch.float32)
    try:
        for _ in range(3):  # three steps: the reader wraps around the cycle
            for key, path in order:
                got = stream.acquire(*key)
                want = {n: t.to(torch.float32) for n, t in read_block_raw(path).items()}
                assert set(got) == set(want)
                for name in want:
                    assert got[name].dtype == torch.float32
                    assert torch.equal(got[name], want[name])
                stream.release(*key)
        stats = stream.stats()
        assert stats.bytes_read >= 3 * sum(p.stat().st_size for _, p in order)
        assert stream.resident_bytes <= 3 * 4096 * (
            1 + max(p.stat().st_size for _, p in order) // 4096
        )
    finally:
        stream.close()


def test_window_must_hold_two_blocks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 2"):
        StreamingWeights(_blocks(tmp_path, 2, torch.float32), window=1, dtype=torch.float32)


def test_window_choice_follows_the_memory_limit() -> None:
    sizes = [10 * MiB] * 20
    fixed = 300 * MiB
    no_limit = choose_agent_window(
        MemoryPolicy(), sizes, expand=1, fixed_bytes=fixed, plan_hint=0, agent="a"
    )
    assert no_limit == 20
    roomy = MemoryPolicy(limit_bytes=1024 * MiB)
    assert (
        choose_agent_window(roomy, sizes, expand=1, fixed_bytes=fixed, plan_hint=0, agent="a") == 20
    )
    tight = MemoryPolicy(limit_bytes=450 * MiB)
    window = choose_agent_window(tight, sizes, expand=1, fixed_bytes=fixed, plan_hint=0, agent="a")
    assert 2 <= window < 20
    assert window * 10 * MiB <= 450 * MiB - fixed
    forced = MemoryPolicy(limit_bytes=450 * MiB, window_override=4)
    assert (
        choose_agent_window(forced, sizes, expand=1, fixed_bytes=fixed, plan_hint=0, agent="a") == 4
    )


def test_window_refused_when_two_blocks_do_not_fit() -> None:
    from edgecluster.errors import PlanError

    tiny = MemoryPolicy(limit_bytes=330 * MiB)
    with pytest.raises(PlanError, match="agent-x"):
        choose_agent_window(
            tiny, [40 * MiB] * 8, expand=1, fixed_bytes=300 * MiB, plan_hint=0, agent="agent-x"
        )


CAP_BYTES = 400 * MiB
PROMPT = [1, 504, 3458, 282, 4649, 314, 253, 1345, 28, 30]


@pytest.mark.root
@pytest.mark.slow
def test_agent_streams_under_a_real_memory_limit(tmp_path: Path) -> None:
    """SmolLM2 (425 MB of fp32 layer weights) on one agent capped at 400 MiB by a cgroup."""
    reason = available()
    if reason is not None:
        pytest.skip(f"needs a cgroup v1 memory controller: {reason}")
    from edgecluster.weights.models import resolve_model

    try:
        model_dir = resolve_model("smollm2-135m")
    except ValueError as exc:
        pytest.skip(str(exc))
    free = ParityCluster(tmp_path / "free", 1)
    try:
        serving = free.serving(model_dir, max_context=256)
        ref_tokens, _ = greedy(serving, free.members(), [1.0], PROMPT, 12)
        serving.close()
    finally:
        free.close()
    limits = DeviceLimits(memory_bytes=CAP_BYTES)
    with EmulatedDevice("ectest-stream", limits, io_path=tmp_path) as device:
        capped = ParityCluster(
            tmp_path / "capped",
            1,
            launcher=device.popen,
            agent_args=["--memory-limit", str(CAP_BYTES)],
        )
        try:
            serving = capped.serving(model_dir, max_context=256)
            tokens, _ = greedy(serving, capped.members(), [1.0], PROMPT, 12)
            member = _wait_runtime(capped)
            serving.close()
        finally:
            capped.close()
        assert not device.oom_killed(), "the capped agent was OOM-killed"
    assert tokens == ref_tokens
    runtime = member.runtime
    assert runtime.streaming and 2 <= runtime.window_blocks < 60
    assert runtime.weight_bytes > CAP_BYTES, "the shard must be larger than the cap"
    assert 0 < runtime.peak_rss_bytes < CAP_BYTES
    assert runtime.read_bytes_per_s > 0


def _wait_runtime(cluster: ParityCluster):
    import time

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        member = cluster.members()[0]
        if member.runtime.session_id and member.runtime.read_bytes_per_s > 0:
            return member
        time.sleep(0.2)
    return cluster.members()[0]
