"""The distributed model matches Hugging Face transformers on the same checkpoint.

fp32, greedy: identical tokens for 32 new tokens and logits within 1e-3 at every
step, on 1, 2, 3 and 5 real agent processes with uneven capacities (so head and
column ranges are uneven, and at 5 agents query heads of one KV group land on
different agents).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from tests.parity_cluster import ParityCluster, greedy, greedy_on

NEW_TOKENS = 32
UNEVEN = [3.0, 1.0, 2.0, 1.0, 5.0]
AGENT_COUNTS = [1, 2, 3, 5]


def _make_tiny(kind: str, path: Path) -> Path:
    torch.manual_seed(7)
    common = dict(
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    if kind == "llama":
        cfg = LlamaConfig(**common, rope_theta=10000.0)
    elif kind == "llama3":  # Llama 3's rope_scaling, with a short original context
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32}  # fmt: skip
        cfg = LlamaConfig(**common, rope_parameters=rope)
    else:
        cfg = Qwen2Config(**common, rope_theta=10000.0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(path)
    return path


def _reference(model_dir: Path, prompt: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),  # token 0 is a real token, not padding
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    return out.sequences[0, len(prompt) :].tolist(), [s[0].float() for s in out.logits]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    c = ParityCluster(tmp_path_factory.mktemp("parity"), num_agents=max(AGENT_COUNTS))
    yield c
    c.close()


def _check(cluster: ParityCluster, model_dir: Path, prompt: list[int]) -> None:
    ref_tokens, ref_logits = _reference(model_dir, prompt)
    serving = cluster.serving(model_dir)
    try:
        members = cluster.members()
        for n in AGENT_COUNTS:
            tokens, logits = greedy(serving, members[:n], UNEVEN[:n], prompt, NEW_TOKENS)
            assert tokens == ref_tokens, f"{n} agents: tokens differ from transformers"
            worst = max(float((a - b).abs().max()) for a, b in zip(logits, ref_logits, strict=True))
            assert worst <= 1e-3, f"{n} agents: logits differ by {worst:.2e}"
    finally:
        serving.close()


@pytest.mark.parametrize(
    ("kind", "prompt_len"),
    # 70 + 32 tokens outgrow the first KV-cache allocation and llama3's original context
    [("llama", 8), ("qwen2", 70), ("llama3", 70)],
)
def test_tiny_model_parity(
    cluster: ParityCluster, tmp_path: Path, kind: str, prompt_len: int
) -> None:
    model_dir = _make_tiny(kind, tmp_path / kind)
    prompt = [(17 * i + 3) % 256 for i in range(prompt_len)]
    _check(cluster, model_dir, prompt=prompt)


@pytest.mark.slow
def test_smollm2_parity(cluster: ParityCluster) -> None:
    pytest.importorskip("gguf")
    from edgecluster.weights.models import resolve_model

    try:
        model_dir = resolve_model("smollm2-135m")
    except ValueError as exc:
        pytest.skip(str(exc))
    _check(cluster, model_dir, prompt=[1, 504, 3458, 282, 4649, 314, 253, 1345, 28, 30])


def test_emulated_links_keep_parity_and_reach_every_rank(
    cluster: ParityCluster, tmp_path: Path
) -> None:
    """A cluster file whose only slow pair is agent <-> agent: the hub's links carry
    the figures it names, the agents' direct all-reduces wait for theirs (a lower
    bound on the step time only the agents can cause), and the tokens do not change."""
    model_dir = _make_tiny("llama", tmp_path / "llama")
    prompt = [(17 * i + 3) % 256 for i in range(8)]
    ref_tokens, _ = _reference(model_dir, prompt)
    slow_ms, new_tokens, num_layers = 40.0, 4, 3
    links = {
        "links": [
            {"from": "coordinator", "to": "parity-0", "latency_ms": 1, "bandwidth_mb_s": 500},
            {"from": "parity-0", "to": "parity-1", "latency_ms": slow_ms, "bandwidth_mb_s": 50},
        ]
    }
    path = tmp_path / "links.json"
    path.write_text(json.dumps(links))
    serving = cluster.serving(model_dir, cluster_file=str(path))
    try:
        members = cluster.members()[:2]
        comm = serving.open_session(serving.plan(members, weights=UNEVEN[:2]), members)
        delays = sorted(comm.link(rank).emulation.delay_ms for rank in (1, 2))
        assert delays == [0.0, 1.0]  # the hub's own links: only coordinator <-> parity-0
        start = time.monotonic()
        tokens, _ = greedy_on(serving.hub, comm, prompt, new_tokens)
        elapsed = time.monotonic() - start
        assert tokens == ref_tokens[:new_tokens]
        # every step: at least one all-reduce per layer between the two agents
        assert elapsed >= new_tokens * num_layers * slow_ms / 1e3, f"{elapsed:.3f} s"
    finally:
        serving.close()
