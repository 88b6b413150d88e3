"""Checkpoint reads and block slicing against the tensors of tiny random HF models."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from edgecluster.model_config import ATTN, MLP
from edgecluster.types import ShardSpec
from edgecluster.weights.checkpoint import Checkpoint
from edgecluster.weights.slicing import (
    block_bytes,
    block_shapes,
    hub_tensors,
    slice_block,
    tensor_digest,
)

SIZES: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
)
# Uneven three-way split, more nodes than KV heads: node 1 shares both KV heads.
THREE_WAY = [
    ShardSpec(q_head_start=0, q_head_end=1, kv_head_start=0, kv_head_end=1,
              mlp_col_start=0, mlp_col_end=10, holds_output_bias=True),
    ShardSpec(q_head_start=1, q_head_end=3, kv_head_start=0, kv_head_end=2,
              mlp_col_start=10, mlp_col_end=57),
    ShardSpec(q_head_start=3, q_head_end=4, kv_head_start=1, kv_head_end=2,
              mlp_col_start=57, mlp_col_end=96),
]  # fmt: skip
TWO_WAY = [
    ShardSpec(q_head_start=0, q_head_end=2, kv_head_start=0, kv_head_end=1,
              mlp_col_start=0, mlp_col_end=31),
    ShardSpec(q_head_start=2, q_head_end=4, kv_head_start=1, kv_head_end=2,
              mlp_col_start=31, mlp_col_end=96, holds_output_bias=True),
]  # fmt: skip

INT4_WAY = [  # the planner gives int4 MLP columns in whole groups of 32
    ShardSpec(q_head_start=0, q_head_end=2, kv_head_start=0, kv_head_end=1,
              mlp_col_start=0, mlp_col_end=32),
    ShardSpec(q_head_start=2, q_head_end=4, kv_head_start=1, kv_head_end=2,
              mlp_col_start=32, mlp_col_end=96, holds_output_bias=True),
]  # fmt: skip


def _save(model: PreTrainedModel, path: Path, **kwargs: Any) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # random norms and biases too, so misplaced ones show
    model.save_pretrained(path, **kwargs)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("llama")
    model = LlamaForCausalLM(LlamaConfig(**SIZES, tie_word_embeddings=False))
    return path, _save(model, path)


@pytest.fixture(scope="module")
def llama_bias(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("llama_bias")
    cfg = LlamaConfig(**SIZES, attention_bias=True, mlp_bias=True, tie_word_embeddings=True)
    return path, _save(LlamaForCausalLM(cfg), path)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("qwen2")
    model = Qwen2ForCausalLM(Qwen2Config(**SIZES, tie_word_embeddings=False))
    return path, _save(model, path, max_shard_size="40KB")


def _reassemble(ckpt: Checkpoint, specs: list[ShardSpec], layer: int) -> dict[str, torch.Tensor]:
    """Rebuild the HF tensors of one layer from every node's blocks."""
    cfg, p = ckpt.model_config, f"model.layers.{layer}."
    pieces: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)  # HF name -> {start: rows}
    for spec in specs:
        attn = slice_block(ckpt, cfg, spec, layer, ATTN, torch.float32)
        mlp = slice_block(ckpt, cfg, spec, layer, MLP, torch.float32)
        _split_qkv(pieces, attn, spec, cfg.head_dim, p + "self_attn.")
        for part in ("weight", "bias"):
            if f"gate_up_{part}" in mlp:
                gate, up = mlp[f"gate_up_{part}"].chunk(2)
                pieces[f"{p}mlp.gate_proj.{part}"][spec.mlp_col_start] = gate
                pieces[f"{p}mlp.up_proj.{part}"][spec.mlp_col_start] = up
        pieces[p + "self_attn.o_proj.weight"][spec.q_head_start] = attn["o_weight"].t()
        pieces[p + "mlp.down_proj.weight"][spec.mlp_col_start] = mlp["down_weight"].t()
        held = {
            "input_layernorm.weight": attn["input_norm"],
            "post_attention_layernorm.weight": mlp["post_norm"],
            "self_attn.o_proj.bias": attn.get("o_bias"),
            "mlp.down_proj.bias": mlp.get("down_bias"),
        }
        for name, t in held.items():
            if t is not None:
                assert p + name not in pieces or torch.equal(pieces[p + name][0], t)
                pieces[p + name][0] = t  # replicated (norms) or held by one node (biases)
    full = {name: torch.cat([rows[k] for k in sorted(rows)]) for name, rows in pieces.items()}
    for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
        full[p + name] = full[p + name].t()
    return full


def _split_qkv(
    pieces: dict[str, dict[int, torch.Tensor]],
    attn: dict[str, torch.Tensor],
    spec: ShardSpec,
    hd: int,
    prefix: str,
) -> None:
    nq, nkv = spec.num_q_heads * hd, spec.num_kv_heads * hd
    for part in ("weight", "bias"):
        if f"qkv_{part}" not in attn:
            continue
        q, k, v = attn[f"qkv_{part}"].split([nq, nkv, nkv])
        pieces[f"{prefix}q_proj.{part}"][spec.q_head_start] = q
        for name, t in (("k", k), ("v", v)):
            for i, head in enumerate(range(spec.kv_head_start, spec.kv_head_end)):
                rows = t[i * hd : (i + 1) * hd]
                known = pieces[f"{prefix}{name}_proj.{part}"].setdefault(head, rows)
                assert torch.equal(known, rows)  # a KV head shared by two nodes is the same


@pytest.mark.parametrize("specs", [THREE_WAY, TWO_WAY], ids=["three", "two"])
@pytest.mark.parametrize("model", ["llama", "llama_bias", "qwen2"])
def test_slices_reassemble_to_hf_tensors(
    model: str, specs: list[ShardSpec], request: pytest.FixtureRequest
) -> None:
    path, reference = request.getfixturevalue(model)
    ckpt = Checkpoint(path)
    for layer in range(ckpt.model_config.num_layers):
        rebuilt = _reassemble(ckpt, specs, layer)
        expected = {k: v for k, v in reference.items() if k.startswith(f"model.layers.{layer}.")}
        assert rebuilt.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(rebuilt[name], tensor), name


def test_output_biases_only_on_the_holder(llama_bias: tuple[Path, dict]) -> None:
    ckpt = Checkpoint(llama_bias[0])
    cfg = ckpt.model_config
    assert cfg.o_bias and cfg.mlp_bias
    holder, other = THREE_WAY[0], THREE_WAY[1]
    assert "o_bias" in slice_block(ckpt, cfg, holder, 0, ATTN, torch.float32)
    assert "down_bias" in slice_block(ckpt, cfg, holder, 0, MLP, torch.float32)
    assert "o_bias" not in slice_block(ckpt, cfg, other, 0, ATTN, torch.float32)
    assert "down_bias" not in slice_block(ckpt, cfg, other, 0, MLP, torch.float32)


def test_qwen2_has_qkv_bias_but_no_o_bias(qwen2: tuple[Path, dict]) -> None:
    ckpt = Checkpoint(qwen2[0])
    block = slice_block(ckpt, ckpt.model_config, THREE_WAY[0], 1, ATTN, torch.float32)
    assert set(block) == {"input_norm", "qkv_weight", "qkv_bias", "o_weight"}
    assert block["qkv_bias"].shape == (3 * 16,)


def test_sharded_checkpoint_reads_like_its_tensors(qwen2: tuple[Path, dict]) -> None:
    path, reference = qwen2
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("*.safetensors"))) > 2
    ckpt = Checkpoint(path)
    for name, tensor in reference.items():
        assert torch.equal(ckpt.tensor(name), tensor), name
    w = reference["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(ckpt.rows("model.layers.1.mlp.down_proj.weight", 5, 9), w[5:9])
    assert torch.equal(ckpt.cols("model.layers.1.mlp.down_proj.weight", 7, 30), w[:, 7:30])
    assert torch.equal(ckpt.rows("model.norm.weight", 3, 8), reference["model.norm.weight"][3:8])


def test_block_dtype_and_sizes_match_block_bytes(llama: tuple[Path, dict]) -> None:
    ckpt = Checkpoint(llama[0])
    cfg = ckpt.model_config
    for spec in THREE_WAY:
        for kind in (ATTN, MLP):
            block = slice_block(ckpt, cfg, spec, 0, kind, torch.bfloat16)
            assert all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in block.values())
            assert {n: tuple(t.shape) for n, t in block.items()} == block_shapes(cfg, spec, kind)
            nbytes = sum(t.numel() * t.element_size() for t in block.values())
            assert nbytes == block_bytes(cfg, spec, kind, torch.bfloat16)


def test_empty_share_gives_zero_size_tensors(llama: tuple[Path, dict]) -> None:
    ckpt = Checkpoint(llama[0])
    cfg = ckpt.model_config
    empty = ShardSpec(q_head_start=4, q_head_end=4, kv_head_start=2, kv_head_end=2,
                      mlp_col_start=96, mlp_col_end=96)  # fmt: skip
    attn = slice_block(ckpt, cfg, empty, 0, ATTN, torch.float32)
    mlp = slice_block(ckpt, cfg, empty, 0, MLP, torch.float32)
    assert attn["qkv_weight"].shape == (0, 64) and attn["o_weight"].shape == (64, 0)
    assert mlp["gate_up_weight"].shape == (0, 64) and mlp["down_weight"].shape == (64, 0)
    assert block_bytes(cfg, empty, MLP, torch.float32) == 64 * 4  # only the norm


def test_bad_specs_are_refused(llama: tuple[Path, dict]) -> None:
    ckpt = Checkpoint(llama[0])
    cfg = ckpt.model_config
    too_many = ShardSpec(q_head_start=0, q_head_end=5, kv_head_start=0, kv_head_end=2,
                         mlp_col_start=0, mlp_col_end=96)  # fmt: skip
    no_kv = ShardSpec(q_head_start=2, q_head_end=4, kv_head_start=0, kv_head_end=1,
                      mlp_col_start=0, mlp_col_end=96)  # fmt: skip
    with pytest.raises(ValueError, match="q heads"):
        slice_block(ckpt, cfg, too_many, 0, ATTN, torch.float32)
    with pytest.raises(ValueError, match="need kv heads"):
        block_bytes(cfg, no_kv, ATTN, torch.float32)
    with pytest.raises(ValueError, match="layer 2"):
        slice_block(ckpt, cfg, THREE_WAY[0], 2, MLP, torch.float32)
    with pytest.raises(ValueError, match="block kind"):
        block_shapes(cfg, THREE_WAY[0], "moe")


def test_hub_tensors_untied_and_tied(
    llama: tuple[Path, dict], llama_bias: tuple[Path, dict]
) -> None:
    path, reference = llama
    hub = hub_tensors(Checkpoint(path), Checkpoint(path).model_config, torch.float32)
    assert torch.equal(hub["lm_head"], reference["lm_head.weight"])
    assert torch.equal(hub["embed"], reference["model.embed_tokens.weight"])
    assert torch.equal(hub["final_norm"], reference["model.norm.weight"])
    tied = Checkpoint(llama_bias[0])
    assert "lm_head.weight" not in tied.names() and tied.has("lm_head.weight")
    hub = hub_tensors(tied, tied.model_config, torch.bfloat16)
    assert hub["lm_head"] is hub["embed"] and hub["embed"].dtype == torch.bfloat16
    assert torch.equal(tied.tensor("lm_head.weight"), tied.tensor("model.embed_tokens.weight"))


def test_checkpoint_errors(tmp_path: Path, llama: tuple[Path, dict]) -> None:
    with pytest.raises(ValueError, match="no config.json"):
        Checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="never pickle"):
        Checkpoint(tmp_path)
    ckpt = Checkpoint(llama[0])
    with pytest.raises(ValueError, match="not in checkpoint"):
        ckpt.tensor("model.layers.9.mlp.up_proj.weight")
    with pytest.raises(ValueError, match="outside dim 1"):
        ckpt.cols("model.layers.0.mlp.up_proj.weight", 0, 65)


def test_tensor_digest_covers_name_dtype_shape_and_bytes() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    base = tensor_digest({"a": t, "b": t[0]})
    assert base == tensor_digest({"b": t[0].clone(), "a": t.clone()})  # order-free
    assert base != tensor_digest({"a": t.reshape(4, 3), "b": t[0]})
    assert base != tensor_digest({"a": t.to(torch.int32).view(torch.float32), "b": t[0]})
    assert base != tensor_digest({"c": t, "b": t[0]})
    bumped = t.clone()
    bumped[2, 3] += 1
    assert base != tensor_digest({"a": bumped, "b": t[0]})
    assert tensor_digest({"a": t.t()}) == tensor_digest({"a": t.t().contiguous()})


@pytest.mark.parametrize("mode", ["fp32", "bf16", "int8", "int4"])
def test_blocks_are_stored_in_the_weights_mode(llama_bias: tuple[Path, dict], mode: str) -> None:
    """Matrices in the mode, norms and biases in the dense dtype; the stored bytes are
    what stored_block_shapes / block_bytes say, and the matrices dequantize to the slice."""
    from edgecluster.weights.quant import dequantize_matrix, stored_mode
    from edgecluster.weights.slicing import MATRICES, stored_block_shapes

    ckpt = Checkpoint(llama_bias[0])
    cfg = ckpt.model_config
    bound = {"fp32": 0.0, "bf16": 0.01, "int8": 0.02, "int4": 0.15}[mode]
    specs = [*THREE_WAY, *TWO_WAY] if mode != "int4" else INT4_WAY  # whole int4 groups
    for spec in specs:
        for kind in (ATTN, MLP):
            block = slice_block(ckpt, cfg, spec, 1, kind, torch.float32, weights=mode)
            dense = slice_block(ckpt, cfg, spec, 1, kind, torch.float32)
            shapes = stored_block_shapes(cfg, spec, kind, torch.float32, mode)
            assert {n: (tuple(t.shape), t.dtype) for n, t in block.items()} == shapes
            nbytes = sum(t.numel() * t.element_size() for t in block.values())
            assert nbytes == block_bytes(cfg, spec, kind, torch.float32, mode)
            for name, want in dense.items():
                if name not in MATRICES:
                    assert torch.equal(block[name], want)
                    continue
                assert stored_mode(block, name) == mode
                got = dequantize_matrix(block, name)
                if want.numel():
                    error = float((got - want).norm() / want.norm())
                    assert error <= bound, f"{mode} {name}: {error:.3f} relative error"


def test_int4_refuses_an_odd_column_share(llama: tuple[Path, dict]) -> None:
    ckpt = Checkpoint(llama[0])
    with pytest.raises(ValueError, match="even number of input columns, got 47"):
        slice_block(ckpt, ckpt.model_config, THREE_WAY[1], 0, MLP, torch.float32, weights="int4")
