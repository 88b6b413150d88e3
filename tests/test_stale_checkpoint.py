"""A checkpoint whose weights change in place (same layout) is never served from stale
shards: serve, rewrite model.safetensors with other values, serve again with the same
agents: the new weights answer (transformers agrees) and the agents fetched again."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.parity_cluster import ParityCluster, greedy
from tests.test_parity import _make_tiny, _reference

pytestmark = pytest.mark.slow  # two agent processes, three sessions, transformers twice
PROMPT = [5, 17, 42, 99, 3, 250, 7, 64]


def _layout(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    with safe_open(str(path), "pt") as f:
        slices = {name: f.get_slice(name) for name in f.keys()}  # noqa: SIM118
        return {n: (s.get_dtype(), tuple(s.get_shape())) for n, s in slices.items()}


def _serve_once(cluster: ParityCluster, model_dir: Path) -> tuple[str, list[int], dict[str, int]]:
    serving = cluster.serving(model_dir)  # a fresh coordinator session: `serve` again
    try:
        tokens, _ = greedy(serving, cluster.members(), [1.0, 1.0], PROMPT, 32)
        assert serving._session is not None
        return serving._model_id, tokens, dict(serving._session.bytes_sent)
    finally:
        serving.close()


def test_weights_changed_in_place_are_served_fresh(tmp_path: Path) -> None:
    model_dir = _make_tiny("llama", tmp_path / "tiny")
    weights = model_dir / "model.safetensors"
    cluster = ParityCluster(tmp_path / "cluster", 2)
    try:
        first_id, first, sent = _serve_once(cluster, model_dir)
        assert first == _reference(model_dir, PROMPT)[0]
        assert all(sent.values()), sent

        layout = _layout(weights)
        torch.manual_seed(11)
        state = load_file(str(weights))
        save_file({n: t + 0.05 * torch.randn_like(t) for n, t in state.items()}, str(weights))
        assert _layout(weights) == layout, "the rewrite must keep names, dtypes and shapes"
        want = _reference(model_dir, PROMPT)[0]
        assert want != first, "the new weights must answer differently for this test to tell"

        second_id, second, sent = _serve_once(cluster, model_dir)
        assert second_id != first_id
        assert second == want
        assert all(sent.values()), f"every agent must fetch its blocks again: {sent}"

        third_id, third, sent = _serve_once(cluster, model_dir)  # unchanged: cache reused
        assert third_id == second_id and third == want
        assert not any(sent.values()), sent
    finally:
        cluster.close()
