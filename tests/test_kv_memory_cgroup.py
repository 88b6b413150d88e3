"""The KV memory plan under a real cgroup: a 400 MiB agent serves SmolLM2 at the
default --max-context by streaming, stays under its cap and answers correctly."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from edgecluster.device.emulated import DeviceLimits, EmulatedDevice, available
from tests.parity_cluster import ParityCluster, greedy

MiB = 1 << 20
CAP_BYTES = 400 * MiB
PROMPT = [1, 504, 3458, 282, 4649, 314, 253, 1345, 28, 30]
NEW_TOKENS = 8


def _reference(model_dir: Path) -> list[int]:
    """transformers' greedy tokens on the same checkpoint (float32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=8
        )
    return [int(t) for t in out[0, len(PROMPT) :]]


@pytest.mark.root
@pytest.mark.slow
def test_400_mib_agent_serves_smollm2_at_the_default_context(tmp_path: Path) -> None:
    reason = available()
    if reason is not None:
        pytest.skip(f"needs a cgroup v1 memory controller: {reason}")
    from edgecluster.weights.models import resolve_model

    try:
        model_dir = resolve_model("smollm2-135m")
    except ValueError as exc:
        pytest.skip(str(exc))
    want = _reference(model_dir)
    with EmulatedDevice(
        "ectest-kvmem", DeviceLimits(memory_bytes=CAP_BYTES), io_path=tmp_path
    ) as dev:
        cluster = ParityCluster(
            tmp_path / "capped", 1, launcher=dev.popen, agent_args=["--memory-limit", "400MiB"]
        )
        try:
            serving = cluster.serving(model_dir)  # the default --max-context and KV budget
            assert serving.context_length == 2048
            tokens, _ = greedy(serving, cluster.members(), [1.0], PROMPT, NEW_TOKENS)
            plan = serving._session.plan if serving._session else None
            member = _wait_runtime(cluster)
            serving.close()
        finally:
            cluster.close()
        assert not dev.oom_killed(), "the capped agent was OOM-killed"
    assert tokens == want
    assert plan is not None and plan.kv_budget_tokens >= 256
    runtime = member.runtime
    assert runtime.streaming and runtime.window_blocks >= 2
    assert 0 < runtime.peak_rss_bytes < CAP_BYTES, "the agent went over its cap (VmHWM)"


def _wait_runtime(cluster: ParityCluster):
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        member = cluster.members()[0]
        if member.runtime.session_id and member.runtime.read_bytes_per_s > 0:
            return member
        time.sleep(0.2)
    return cluster.members()[0]
