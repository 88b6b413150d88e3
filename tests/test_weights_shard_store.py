"""ShardStore: round trip, damaged caches found, bad transfers refused; the one-read reader."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from edgecluster.model_config import ModelConfig
from edgecluster.types import ShardSpec
from edgecluster.weights.shard_store import ShardStore, read_block_raw
from edgecluster.weights.slicing import tensor_digest

KEY = "smol-3b2c69dff189-n0"
BLOCKS = ["layers.000.attn", "layers.000.mlp", "layers.001.attn"]
SPEC = ShardSpec(q_head_start=0, q_head_end=2, kv_head_start=0, kv_head_end=1,
                 mlp_col_start=0, mlp_col_end=8, holds_output_bias=True)  # fmt: skip
CONFIG = ModelConfig(model_type="llama", hidden_size=16, intermediate_size=24, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=4, vocab_size=32,
                     rms_norm_eps=1e-5, rope_theta=1e4)  # fmt: skip


def _block(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_norm": torch.randn(16, generator=g).to(torch.bfloat16),
        "qkv_weight": torch.randn(16, 16, generator=g).to(torch.bfloat16),
        "o_weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "o_bias": torch.randn(16, generator=g).to(torch.bfloat16),
    }


@pytest.fixture()
def filled(tmp_path: Path) -> tuple[ShardStore, dict[str, dict[str, torch.Tensor]]]:
    store = ShardStore(tmp_path)
    store.write_meta(KEY, CONFIG.to_json(), SPEC, torch.bfloat16)
    blocks = {name: _block(i) for i, name in enumerate(BLOCKS)}
    for name, tensors in blocks.items():
        store.write_block(KEY, name, tensors, tensor_digest(tensors))
    return store, blocks


def test_round_trip(filled: tuple[ShardStore, dict]) -> None:
    store, blocks = filled
    assert store.missing_blocks(KEY, BLOCKS + ["layers.001.mlp"]) == ["layers.001.mlp"]
    for name, tensors in blocks.items():
        loaded = store.load_block(KEY, name)  # as stored: bf16 stays bf16
        assert tensor_digest(loaded) == tensor_digest(tensors)
        assert all(t.dtype == torch.bfloat16 for t in loaded.values())
    files = [store.block_path(KEY, b) for b in BLOCKS]
    assert store.shard_bytes(KEY) == sum(f.stat().st_size for f in files)
    meta = store.read_meta(KEY)
    assert meta is not None
    assert (meta.model_config, meta.spec, meta.storage_dtype) == (CONFIG, SPEC, torch.bfloat16)
    assert not [p for p in store.shard_dir(KEY).iterdir() if p.name.endswith(".tmp")]


def test_reopened_store_trusts_verified_cache(filled: tuple[ShardStore, dict]) -> None:
    store, _ = filled
    assert ShardStore(store.root).missing_blocks(KEY, BLOCKS) == []


def test_flipped_byte_is_missing(filled: tuple[ShardStore, dict]) -> None:
    store, _ = filled
    path = store.block_path(KEY, BLOCKS[1])
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    assert store.missing_blocks(KEY, BLOCKS) == [BLOCKS[1]]


def test_truncated_or_deleted_file_is_missing(filled: tuple[ShardStore, dict]) -> None:
    store, _ = filled
    path = store.block_path(KEY, BLOCKS[0])
    os.truncate(path, path.stat().st_size - 100)
    store.block_path(KEY, BLOCKS[2]).unlink()
    assert store.missing_blocks(KEY, BLOCKS) == [BLOCKS[0], BLOCKS[2]]


def test_lost_manifest_means_everything_is_missing(filled: tuple[ShardStore, dict]) -> None:
    store, _ = filled
    (store.shard_dir(KEY) / "manifest.json").write_text("{not json")
    assert store.missing_blocks(KEY, BLOCKS) == BLOCKS


def test_wrong_digest_is_refused_and_nothing_written(tmp_path: Path) -> None:
    store = ShardStore(tmp_path)
    tensors = _block(0)
    damaged = {**tensors, "o_bias": tensors["o_bias"].clone()}
    damaged["o_bias"][3] += 1
    with pytest.raises(ValueError, match="damaged in transfer"):
        store.write_block(KEY, BLOCKS[0], damaged, tensor_digest(tensors))
    assert store.missing_blocks(KEY, BLOCKS[:1]) == BLOCKS[:1]
    assert not store.block_path(KEY, BLOCKS[0]).exists()


def test_changed_meta_forgets_blocks(filled: tuple[ShardStore, dict]) -> None:
    store, _ = filled
    store.write_meta(KEY, CONFIG.to_json(), SPEC, torch.bfloat16)  # same meta: kept
    assert store.missing_blocks(KEY, BLOCKS) == []
    store.write_meta(KEY, CONFIG.to_json(), SPEC, torch.float16)
    assert store.missing_blocks(KEY, BLOCKS) == BLOCKS


def test_prune_keeps_only_named_shards(filled: tuple[ShardStore, dict]) -> None:
    store, blocks = filled
    store.write_block("other", BLOCKS[0], blocks[BLOCKS[0]], tensor_digest(blocks[BLOCKS[0]]))
    assert store.shard_keys() == ["other", KEY]
    assert store.prune({KEY}) == ["other"]
    assert store.shard_keys() == [KEY]


@pytest.mark.parametrize("bad", ["../escape", "a/b", "", ".hidden", "x" * 300])
def test_unsafe_names_are_refused(tmp_path: Path, bad: str) -> None:
    store = ShardStore(tmp_path)
    with pytest.raises(ValueError, match="not a safe file name"):
        store.block_path(bad, "layers.000.attn")
    with pytest.raises(ValueError, match="not a safe file name"):
        store.block_path(KEY, bad)


def test_read_block_raw_matches_safetensors(tmp_path: Path) -> None:
    tensors = {
        "a": torch.randn(7, 3),
        "b": torch.randn(5).to(torch.bfloat16),
        "c": torch.arange(3, dtype=torch.int64),
        "d": torch.ones(3, dtype=torch.bool),
        "empty": torch.empty(0, 16),
    }
    path = tmp_path / "block.safetensors"
    save_file(tensors, str(path))
    raw = read_block_raw(path)
    reference = load_file(str(path))
    assert raw.keys() == reference.keys()
    for name, t in reference.items():
        assert raw[name].dtype == t.dtype and torch.equal(raw[name], t), name
    # views of one buffer, not copies
    assert raw["a"].untyped_storage().data_ptr() == raw["c"].untyped_storage().data_ptr()


def test_read_block_raw_refuses_truncated_and_forged_files(tmp_path: Path) -> None:
    path = tmp_path / "block.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    with pytest.raises(ValueError, match="truncated"):
        read_block_raw(path)
    path.write_bytes(data[:6])
    with pytest.raises(ValueError, match="too short"):
        read_block_raw(path)
    header = json.dumps({"w": {"dtype": "F32", "shape": [4096], "data_offsets": [0, 64]}})
    path.write_bytes(len(header).to_bytes(8, "little") + header.encode() + bytes(64))
    with pytest.raises(ValueError, match="truncated or corrupted"):
        read_block_raw(path)
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})
    path.write_bytes((10**12).to_bytes(8, "little") + header.encode() + bytes(16))
    with pytest.raises(ValueError, match="header length"):
        read_block_raw(path)


def test_empty_share_block_round_trips(tmp_path: Path) -> None:
    store = ShardStore(tmp_path)
    tensors = {"post_norm": torch.ones(16), "gate_up_weight": torch.empty(0, 16)}
    store.write_block(KEY, "layers.000.mlp", tensors, tensor_digest(tensors))
    assert store.missing_blocks(KEY, ["layers.000.mlp"]) == []
    loaded = store.load_block(KEY, "layers.000.mlp")
    assert loaded["gate_up_weight"].shape == (0, 16)


def test_bad_storage_dtype_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a torch dtype"):
        ShardStore(tmp_path).write_meta(KEY, CONFIG.to_json(), SPEC, "load")


def test_a_shard_recorded_for_another_weights_mode_is_refetched(
    filled: tuple[ShardStore, dict],
) -> None:
    """The weights mode is part of what a shard is: recording int8 over a bf16 shard
    forgets its blocks; an old manifest without a mode reads as its dense dtype's."""
    store, _ = filled
    meta = store.read_meta(KEY)
    assert meta is not None and meta.weights == "bf16" and not meta.quantized
    store.write_meta(KEY, CONFIG.to_json(), SPEC, torch.float32, "int8")
    assert store.missing_blocks(KEY, BLOCKS) == BLOCKS
    meta = store.read_meta(KEY)
    assert meta is not None and (meta.weights, meta.storage_dtype) == ("int8", torch.float32)
    with pytest.raises(ValueError, match="choose one of"):
        store.write_meta(KEY, CONFIG.to_json(), SPEC, torch.float32, "int3")
