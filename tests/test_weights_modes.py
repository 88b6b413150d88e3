"""`--weights int8|int4` served by a real cluster: close to transformers' fp32, packed
shards that are never mistaken for another mode, and streaming that computes the same.

Two agents, one resident and one that streams its blocks (`--window 2`), real
processes on loopback, the tiny random Llama of tests/tiny_llama.py. Logits are
compared teacher-forced on transformers' greedy continuation, so one early near-tie
cannot make every later step incomparable. Measured on this model and prompt (2
agents): relative error of a step's logits at most 2.2% for int8 and 14.5% for int4
(0.7% for bf16), top-1 agreement 16/16 for both; random weights are int4's hard case.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from edgecluster.runtime.serving import ServingCluster
from edgecluster.types import MemberInfo
from edgecluster.weights.shard_store import ShardStore
from tests.parity_cluster import ParityCluster, greedy
from tests.tiny_llama import make_tiny_llama

# Chosen so that every greedy step's top-1 leads its runner-up by at least a fifth of the
# logits' spread: a random model's near-ties would make quantized greedy text diverge.
PROMPT = [(93 * i + 24) % 128 for i in range(12)]
NEW_TOKENS = 16
# (largest relative error of a step's logits, fewest steps whose top-1 token agrees)
BOUNDS = {"int8": (0.03, 15), "int4": (0.2, 14)}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    c = ParityCluster(tmp_path_factory.mktemp("modes"), 2, per_agent_args=[(), ("--window", "2")])
    yield c
    c.close()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", max_positions=512)


@pytest.fixture(scope="module")
def reference(model: Path) -> tuple[list[int], torch.Tensor]:
    """transformers fp32: greedy tokens and the logits [N, V] that predicted each."""
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        ids = torch.tensor([PROMPT])
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )
        logits = hf(out).logits[0, len(PROMPT) - 1 : -1]
    return out[0, len(PROMPT) :].tolist(), logits


def _forced(serving: ServingCluster, members: list[MemberInfo], tokens: list[int]) -> torch.Tensor:
    """Logits [N, V] of the cluster fed the prompt, then `tokens` one step at a time."""
    plan = serving.plan(members, weights=[1.0] * len(members))
    comm = serving.open_session(plan, members)
    rows, start = [], 0
    for step in [PROMPT, *([t] for t in tokens[:-1])]:
        out = serving.hub.forward(comm, torch.tensor(step), [(1, start, len(step))])
        rows.append(out[0])
        start += len(step)
    serving.hub.free(comm, [1])
    return torch.stack(rows)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(((got - want).norm(dim=-1) / want.norm(dim=-1)).max())


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_logits_stay_close_to_fp32(
    cluster: ParityCluster, model: Path, reference: tuple[list[int], torch.Tensor], mode: str
) -> None:
    ref_tokens, ref_logits = reference
    serving = cluster.serving(model, max_context=512, weights=mode)
    try:
        logits = _forced(serving, cluster.members(), ref_tokens)
        view = serving.cluster_view()
    finally:
        serving.close()
    max_error, min_agree = BOUNDS[mode]
    error = _relative_error(logits, ref_logits)
    agree = int((logits.argmax(-1) == ref_logits.argmax(-1)).sum())
    assert error < max_error, f"{mode}: logits differ from fp32 by {error:.1%}"
    assert agree >= min_agree, f"{mode}: top-1 agrees at {agree}/{NEW_TOKENS} steps"
    assert view["weights"] == mode and view["hub"]["weights"] == mode


def test_int8_greedy_text_matches_fp32(
    cluster: ParityCluster, model: Path, reference: tuple[list[int], torch.Tensor]
) -> None:
    serving = cluster.serving(model, max_context=512, weights="int8")
    try:
        tokens, _ = greedy(serving, cluster.members(), [1.0, 1.0], PROMPT, NEW_TOKENS)
    finally:
        serving.close()
    assert tokens == reference[0]


def test_each_mode_has_its_own_shard(cluster: ParityCluster, model: Path) -> None:
    """An fp32 shard is not reused for int8 nor the reverse; the same mode's is. An
    int8 shard is about a quarter of the fp32 one. (A split no other test uses.)"""
    members, split = cluster.members(), [2.0, 1.0]
    sent = []
    for mode in ["fp32", "int8", "fp32", "int8"]:
        serving = cluster.serving(model, max_context=512, weights=mode)
        try:
            serving.open_session(serving.plan(members, weights=split), members)
            assert serving._session is not None
            sent.append(sum(serving._session.bytes_sent.values()))
        finally:
            serving.close()
    assert sent[0] > 0 and sent[1] > 0, f"a shard of the other mode was reused: {sent}"
    assert sent[2:] == [0, 0], f"a shard of the same mode was sent again: {sent}"
    assert 0.2 < sent[1] / sent[0] < 0.35, sent
    store = ShardStore(cluster.root / "agent-0")
    metas = [store.read_meta(key) for key in store.shard_keys()]
    assert {m.weights for m in metas if m is not None} >= {"fp32", "int8"}


def test_streaming_int8_agent_gives_the_resident_tokens(
    cluster: ParityCluster, model: Path, reference: tuple[list[int], torch.Tensor]
) -> None:
    """The whole model on the resident agent, then on the streaming one."""
    resident, streamer = cluster.members()
    serving = cluster.serving(model, max_context=512, weights="int8")
    try:
        want, want_logits = greedy(serving, [resident], [1.0], PROMPT, NEW_TOKENS)
        got, got_logits = greedy(serving, [streamer], [1.0], PROMPT, NEW_TOKENS)
        runtime = _reported_runtime(cluster, streamer.name)
    finally:
        serving.close()
    assert runtime.streaming and runtime.window_blocks == 2
    assert got == want
    assert _relative_error(torch.stack(got_logits), torch.stack(want_logits)) < BOUNDS["int8"][0]


def _reported_runtime(cluster: ParityCluster, name: str):
    deadline = time.monotonic() + 10
    while True:
        member = next(m for m in cluster.members() if m.name == name)
        if member.runtime.session_id or time.monotonic() > deadline:
            return member.runtime
        time.sleep(0.1)
