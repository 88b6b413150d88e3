"""Training checkpoints: HF directories transformers and serving read; exact training state."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from edgecluster.engine.rope import inverse_frequencies
from edgecluster.model_config import ModelConfig
from edgecluster.train.checkpoint import (
    ARCHITECTURES,
    OPTIMIZER_FILE,
    STATE_FILE,
    TRAINING_STATE_DIR,
    hf_config_dict,
    load_training_state,
    save_hf_checkpoint,
    save_training_state,
)
from edgecluster.train.model import (
    FullModel,
    hf_state,
    init_parameters,
)
from edgecluster.weights.checkpoint import Checkpoint


def _cfg(**overrides: object) -> ModelConfig:
    hf = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                     max_position_embeddings=64, rope_theta=500.0, **overrides)  # fmt: skip
    return ModelConfig.from_hf_dict(hf.to_dict())


def _model(cfg: ModelConfig, seed: int = 0) -> FullModel:
    model = FullModel(cfg)
    init_parameters(model, cfg, seed)
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_saved_checkpoint_loads_in_transformers_and_serving(tmp_path: Path, tied: bool) -> None:
    cfg = _cfg(tie_word_embeddings=tied)
    model = _model(cfg, seed=4)
    out = save_hf_checkpoint(tmp_path / "ckpt", cfg, hf_state(model), tokenizer_dir=None)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    ref = AutoModelForCausalLM.from_pretrained(out).float().eval()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert (ref(ids).logits - model(ids)).abs().max() < 1e-5
    ckpt = Checkpoint(out)
    assert ckpt.model_config == cfg
    assert ("lm_head.weight" in ckpt.names()) is not tied  # tied: the embedding answers
    assert torch.equal(ckpt.tensor("lm_head.weight"), model.head.lm_head.weight.detach())
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"


@pytest.mark.parametrize(
    "overrides",
    [
        {"rope_scaling": {"type": "linear", "factor": 2}},  # the legacy spelling
        {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}},
        {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]},
        {"attention_bias": True, "mlp_bias": True},
    ],
    ids=["linear", "llama3", "qwen2", "biases"],
)  # fmt: skip
def test_config_reads_back_as_the_same_model(overrides: dict) -> None:
    source = {**LlamaConfig(hidden_size=32, num_attention_heads=4).to_dict(), **overrides}
    source.pop("rope_parameters")
    cfg = ModelConfig.from_hf_dict(source)
    written = hf_config_dict(cfg)
    back = ModelConfig.from_hf_dict(written)
    assert dataclasses.replace(back, rope_scaling=None) == dataclasses.replace(
        cfg, rope_scaling=None
    )
    assert torch.equal(inverse_frequencies(back), inverse_frequencies(cfg))
    assert written["model_type"] == cfg.model_type
    assert written["architectures"] == [ARCHITECTURES[cfg.model_type]]


def test_tokenizer_files_and_token_ids_are_kept(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / "tokenizer.json").write_text('{"fake": true}')
    (source / "generation_config.json").write_text('{"eos_token_id": 7}')
    (source / "model.safetensors").write_bytes(b"not copied")
    cfg = _cfg(tie_word_embeddings=True)
    base = {"eos_token_id": 7, "bos_token_id": 6, "hidden_size": 999, "quantization_config": {}}
    out = save_hf_checkpoint(
        tmp_path / "out", cfg, hf_state(_model(cfg)), tokenizer_dir=source, base_config=base
    )
    assert (out / "tokenizer.json").read_text() == '{"fake": true}'
    assert (out / "generation_config.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert (config["eos_token_id"], config["bos_token_id"]) == (7, 6)
    assert config["hidden_size"] == 32 and "quantization_config" not in config  # cfg wins


def test_saving_again_replaces_the_directory_whole(tmp_path: Path) -> None:
    cfg = _cfg(tie_word_embeddings=True)
    target = tmp_path / "ckpt"
    save_hf_checkpoint(target, cfg, hf_state(_model(cfg, seed=1)), tokenizer_dir=None)
    (target / "stale.txt").write_text("from the first save")
    second = _model(cfg, seed=2)
    save_hf_checkpoint(target, cfg, hf_state(second), tokenizer_dir=None)
    assert not (target / "stale.txt").exists()
    assert torch.equal(
        Checkpoint(target).tensor("model.norm.weight"), second.head.norm.weight.detach()
    )
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary left behind


def test_training_state_round_trips_bit_exactly(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(123)
    torch.rand(5, generator=gen)
    optimizer = {
        "exp_avg/model.norm.weight": torch.randn(32) * 1e-30,
        "exp_avg_sq/model.norm.weight": torch.rand(32),
        "step/model.norm.weight": torch.tensor(17.0),
    }
    rng = {"generator": gen.get_state(), "python_seed": 99, "numbers": [1, 2.5]}
    meta = {"schedule": "skippipe", "lr": 3e-4, "plan": {"stages": [[0, 1]]}}
    state_dir = tmp_path / "ckpt" / TRAINING_STATE_DIR
    save_training_state(
        state_dir, step=12, data_position=96, rng=rng, optimizer=optimizer, meta=meta
    )
    state = load_training_state(state_dir)
    assert (state.step, state.data_position, state.meta) == (12, 96, meta)
    assert state.optimizer.keys() == optimizer.keys()
    assert all(torch.equal(state.optimizer[k], v) for k, v in optimizer.items())
    assert state.rng["python_seed"] == 99 and state.rng["numbers"] == [1, 2.5]
    restored = torch.Generator().set_state(state.rng["generator"])
    assert torch.equal(torch.rand(3, generator=restored), torch.rand(3, generator=gen))


def test_training_state_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="holds no training state"):
        load_training_state(tmp_path / "nowhere")
    state_dir = tmp_path / "state"
    save_training_state(
        state_dir, step=1, data_position=0, rng={}, optimizer={"a/x": torch.ones(2)}, meta={}
    )
    (state_dir / OPTIMIZER_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ValueError, match="optimizer.safetensors is corrupt"):
        load_training_state(state_dir)
    (state_dir / STATE_FILE).write_text("{truncated")
    with pytest.raises(ValueError, match="training_state.json is corrupt"):
        load_training_state(state_dir)
    with pytest.raises(ValueError, match="plain JSON values"):
        save_training_state(
            state_dir, step=1, data_position=0, rng={}, optimizer={}, meta={"x": object()}
        )
