"""Training modules against transformers: logits, gradients, stage splits, init, eval."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from edgecluster.model_config import ModelConfig
from edgecluster.train.evaluate import eval_loss, layer_subset
from edgecluster.train.model import (
    EmbedHeadStage,
    FullModel,
    LayerStage,
    hf_state,
    init_parameters,
    load_stage_weights,
    read_hf_weights,
)
from tests.tiny_llama import make_tiny_llama

TINY = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
)  # fmt: skip


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _reference(hf_config: object) -> tuple[torch.nn.Module, FullModel]:
    torch.manual_seed(3)
    ref = AutoModelForCausalLM.from_config(hf_config).float()
    for name, p in ref.named_parameters():  # biases and norms non-trivial, so they count
        if name.endswith(("bias", "norm.weight")):
            torch.nn.init.normal_(p, 1.0 if name.endswith("norm.weight") else 0.0, 0.1)
    ours = FullModel(ModelConfig.from_hf_dict(hf_config.to_dict()))  # type: ignore[attr-defined]
    load_stage_weights(ours, ref.state_dict())
    return ref, ours


def _assert_matches_transformers(ref: torch.nn.Module, ours: FullModel) -> None:
    vocab = ours.cfg.vocab_size
    ids, targets = torch.randint(0, vocab, (2, 11)), torch.randint(0, vocab, (2, 11))
    logits = ours(ids)
    assert (logits - ref(ids).logits).abs().max() < 1e-5
    ours.loss_sum(ids, targets).backward()
    ref_loss = F.cross_entropy(ref(ids).logits.flatten(0, 1), targets.flatten(), reduction="sum")
    ref_loss.backward()
    ref_params = dict(ref.named_parameters())
    ours_params = dict(ours.named_parameters())
    names = ours.hf_names()
    assert set(names.values()) == set(ref_params)
    for local, hf in names.items():
        assert _rel(ours_params[local].grad, ref_params[hf].grad) < 1e-5, hf


@pytest.mark.parametrize(
    "hf_config",
    [
        LlamaConfig(**TINY, tie_word_embeddings=True, rope_theta=5000.0),
        LlamaConfig(
            **TINY,
            tie_word_embeddings=False,
            attention_bias=True,
            mlp_bias=True,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
        Qwen2Config(**TINY, tie_word_embeddings=True),
    ],
    ids=["llama-tied", "llama-biases-llama3-rope", "qwen2"],
)
def test_logits_and_gradients_match_transformers(hf_config: object) -> None:
    _assert_matches_transformers(*_reference(hf_config))


def test_tiny_llama_checkpoint_loads_and_matches(tmp_path: Path) -> None:
    model_dir = make_tiny_llama(tmp_path / "tiny", max_positions=64)
    ref = AutoModelForCausalLM.from_pretrained(model_dir).float()
    cfg = ModelConfig.from_hf_dict(ref.config.to_dict())
    ours = FullModel(cfg)
    load_stage_weights(ours, read_hf_weights(model_dir, sorted(ours.hf_names().values())))
    _assert_matches_transformers(ref, ours)


def _cfg(**overrides: object) -> ModelConfig:
    return ModelConfig.from_hf_dict({**LlamaConfig(**TINY).to_dict(), **overrides})


def test_stage_split_equals_full_model() -> None:
    cfg = _cfg(num_hidden_layers=2, tie_word_embeddings=True)
    full = FullModel(cfg)
    init_parameters(full, cfg, seed=5)
    head, s1, s2 = EmbedHeadStage(cfg), LayerStage(cfg, 0, 1), LayerStage(cfg, 1, 2)
    state = hf_state(full)
    for stage in (head, s1, s2):
        load_stage_weights(stage, {k: state[k] for k in stage.hf_names().values()})
    ids, targets = torch.randint(0, 256, (3, 9)), torch.randint(0, 256, (3, 9))
    # the pipeline's way: detached activations between stages, gradients sent back
    h0 = head.embed(ids)
    h1_in = h0.detach().requires_grad_()
    h1 = s1(h1_in)
    h2_in = h1.detach().requires_grad_()
    h2 = s2(h2_in)
    h3_in = h2.detach().requires_grad_()
    loss = head.loss(h3_in, targets)
    loss.backward()
    h2.backward(h3_in.grad)
    h1.backward(h2_in.grad)
    h0.backward(h1_in.grad)
    full_loss = full.loss_sum(ids, targets)
    full_loss.backward()
    assert torch.equal(loss, full_loss)
    grads = {hf: p.grad for s in (head, s1, s2) for hf, p in _by_hf(s).items()}
    for hf, p in _by_hf(full).items():
        assert _rel(grads[hf], p.grad) < 1e-6, hf


def _by_hf(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    params = dict(module.named_parameters())
    return {hf: params[local] for local, hf in module.hf_names().items()}  # type: ignore[operator]


def test_init_is_identical_whatever_the_split() -> None:
    cfg = _cfg(tie_word_embeddings=False)
    full = FullModel(cfg)
    init_parameters(full, cfg, seed=7)
    parts = [EmbedHeadStage(cfg), LayerStage(cfg, 0, 2), LayerStage(cfg, 2, 3)]
    for part in parts:
        init_parameters(part, cfg, seed=7)
    whole = hf_state(full)
    split = {k: v for part in parts for k, v in hf_state(part).items()}
    assert whole.keys() == split.keys()
    assert all(torch.equal(whole[k], split[k]) for k in whole)
    assert torch.equal(whole["model.norm.weight"], torch.ones(cfg.hidden_size))
    std = float(whole["model.layers.1.mlp.up_proj.weight"].std())
    assert 0.015 < std < 0.025
    other = FullModel(cfg)
    init_parameters(other, cfg, seed=8)
    assert not torch.equal(hf_state(other)["lm_head.weight"], whole["lm_head.weight"])


def test_stages_built_on_meta_load_or_init_like_real_ones() -> None:
    cfg = _cfg(tie_word_embeddings=True)
    real = FullModel(cfg)
    init_parameters(real, cfg, seed=9)
    with torch.device("meta"):
        loaded, fresh = FullModel(cfg), FullModel(cfg)
    load_stage_weights(loaded, hf_state(real))
    init_parameters(fresh, cfg, seed=9)
    ids = torch.randint(0, 256, (2, 8))
    for model in (loaded, fresh):
        assert model.head.lm_head.weight is model.head.embed_tokens.weight
        assert torch.equal(model(ids), real(ids))


def test_tied_head_is_one_parameter_and_loads_from_hf_names() -> None:
    cfg = _cfg(tie_word_embeddings=True)
    head = EmbedHeadStage(cfg)
    assert head.lm_head.weight is head.embed_tokens.weight
    assert set(head.hf_names().values()) == {"model.embed_tokens.weight", "model.norm.weight"}
    meta = torch.device("meta")
    with meta:
        lazy = EmbedHeadStage(cfg)
    state = {"model.embed_tokens.weight": torch.randn(256, 64), "model.norm.weight": torch.ones(64)}
    load_stage_weights(lazy, state)
    assert lazy.lm_head.weight is lazy.embed_tokens.weight
    assert torch.equal(lazy.lm_head.weight, state["model.embed_tokens.weight"])


def test_load_stage_weights_names_what_is_wrong() -> None:
    cfg = _cfg()
    stage = LayerStage(cfg, 1, 2)
    good = {hf: torch.zeros(p.shape) for hf, p in _by_hf(stage).items()}
    bad = dict(good)
    del bad["model.layers.1.mlp.up_proj.weight"]
    bad["model.layers.0.mlp.up_proj.weight"] = torch.zeros(96, 64)
    bad["model.layers.1.input_layernorm.weight"] = torch.zeros(65)
    with pytest.raises(ValueError) as err:
        load_stage_weights(stage, bad)
    text = str(err.value)
    assert "missing: model.layers.1.mlp.up_proj.weight" in text
    assert "unexpected: model.layers.0.mlp.up_proj.weight" in text
    assert "model.layers.1.input_layernorm.weight (given [65], expected [64])" in text
    with pytest.raises(ValueError, match="layer range"):
        LayerStage(cfg, 2, 2)


def test_keep_layers_runs_the_given_layers_in_order() -> None:
    cfg = _cfg()
    full = FullModel(cfg)
    init_parameters(full, cfg, seed=1)
    ids = torch.randint(0, 256, (2, 8))
    assert torch.equal(full(ids, keep_layers=[0, 1, 2]), full(ids))
    h = full.head.embed(ids)
    h = full.body.layers[2](full.body.layers[0](h))
    assert torch.equal(full(ids, keep_layers=[0, 2]), full.head.logits(h))
    assert not torch.equal(full(ids, keep_layers=[2, 0]), full(ids, keep_layers=[0, 2]))
    with pytest.raises(ValueError, match="layer 3"):
        full(ids, keep_layers=[3])


def test_eval_loss_is_mean_token_cross_entropy() -> None:
    cfg = _cfg()
    full = FullModel(cfg)
    init_parameters(full, cfg, seed=2)
    batches = [torch.randint(0, 256, (2, 7)), torch.randint(0, 256, (2, 7))]
    with torch.no_grad():
        expected = sum(float(full.loss_sum(b[:, :-1], b[:, 1:])) for b in batches) / 24
    assert eval_loss(full, batches) == pytest.approx(expected, rel=1e-6)
    # an untrained model is close to uniform over the vocabulary
    assert eval_loss(full, batches) == pytest.approx(torch.log(torch.tensor(256.0)).item(), 0.05)
    assert eval_loss(full, batches, keep_layers=[0, 2]) != eval_loss(full, batches)


def test_layer_subset_keeps_ends_and_drops_the_fraction() -> None:
    assert layer_subset(8, 0.0, None) == list(range(8))
    assert layer_subset(8, 0.5, None) == [0, 2, 5, 7]
    assert layer_subset(30, 0.75, None) == [0, 4, 8, 12, 17, 21, 25, 29]
    for seed in (None, 1, 2):
        kept = layer_subset(12, 0.25, seed)
        assert len(kept) == 9 and kept[0] == 0 and kept[-1] == 11 and kept == sorted(set(kept))
    assert layer_subset(12, 0.5, 1) == layer_subset(12, 0.5, 1)
    with pytest.raises(ValueError, match="fraction"):
        layer_subset(8, 1.0, None)
