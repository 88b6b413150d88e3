"""A Llama-shaped Hugging Face checkpoint with random bf16 weights, written in bounded memory.

`make_random_llama(shape, directory)` writes `config.json` (model_type llama) and
safetensors shards of at most ~1 GiB with their index, tensor by tensor and a few
rows at a time, so the writer holds at most one chunk (~64 MiB) of weights however
large the model. Weights are N(0, std) (std 0.02 keeps activations finite through
the layers), norms are ones; no tokenizer is written, so prompts are token ids.
The same shape and seed give the same bytes; `bench_model.json` records them and a
directory holding a matching one is reused as it is.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

SHARD_BYTES = 1 << 30
CHUNK_ELEMENTS = 16 << 20  # fp32 elements generated at once (64 MiB)
MARKER = "bench_model.json"
BF16_BYTES = 2


@dataclass(frozen=True, kw_only=True)
class LlamaShape:
    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    max_position_embeddings: int = 2048
    std: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{self.name}: hidden_size must divide into num_heads, and num_heads into "
                f"num_kv_heads ({self.hidden_size}, {self.num_heads}, {self.num_kv_heads})"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def tensors(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every weight, in the order Hugging Face writes them."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.num_kv_heads * self.head_dim
        yield "model.embed_tokens.weight", (self.vocab_size, h)
        for n in range(self.num_layers):
            p = f"model.layers.{n}."
            yield p + "input_layernorm.weight", (h,)
            yield p + "self_attn.q_proj.weight", (h, h)
            yield p + "self_attn.k_proj.weight", (kv, h)
            yield p + "self_attn.v_proj.weight", (kv, h)
            yield p + "self_attn.o_proj.weight", (h, h)
            yield p + "post_attention_layernorm.weight", (h,)
            yield p + "mlp.gate_proj.weight", (i, h)
            yield p + "mlp.up_proj.weight", (i, h)
            yield p + "mlp.down_proj.weight", (h, i)
        yield "model.norm.weight", (h,)
        yield "lm_head.weight", (self.vocab_size, h)

    @property
    def num_bytes(self) -> int:
        """Bytes of all weights in bf16."""
        return sum(_numel(shape) for _, shape in self.tensors()) * BF16_BYTES

    def hf_config(self) -> dict[str, object]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "bfloat16",
        }


TINYLLAMA_1B = LlamaShape(
    name="tinyllama-1.1b-shape", hidden_size=2048, intermediate_size=5632, num_layers=22,
    num_heads=32, num_kv_heads=4, vocab_size=32000,
)  # fmt: skip
LLAMA2_7B = LlamaShape(
    name="llama2-7b-shape", hidden_size=4096, intermediate_size=11008, num_layers=32,
    num_heads=32, num_kv_heads=32, vocab_size=32000, max_position_embeddings=4096,
)  # fmt: skip


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def is_current(shape: LlamaShape, directory: Path) -> bool:
    """True when `directory` holds a finished checkpoint of exactly `shape`."""
    marker = directory / MARKER
    return marker.is_file() and json.loads(marker.read_text()) == asdict(shape)


def make_random_llama(shape: LlamaShape, directory: Path) -> Path:
    """Writes the checkpoint unless an identical one is there; returns `directory`."""
    if is_current(shape, directory):
        return directory
    tmp = directory.with_name(directory.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    generator = torch.Generator().manual_seed(shape.seed)
    weight_map: dict[str, str] = {}
    shards = _plan_shards(shape)
    for index, names in enumerate(shards):
        file_name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(tmp / file_name, names, shape, generator)
        weight_map.update(dict.fromkeys((n for n, _ in names), file_name))
    index_json = {"metadata": {"total_size": shape.num_bytes}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=1))
    (tmp / "config.json").write_text(json.dumps(shape.hf_config(), indent=1))
    (tmp / MARKER).write_text(json.dumps(asdict(shape)))
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    return directory


def _plan_shards(shape: LlamaShape) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in shape.tensors():
        nbytes = _numel(dims) * BF16_BYTES
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += nbytes
    return shards


def _write_shard(
    path: Path,
    names: list[tuple[str, tuple[int, ...]]],
    shape: LlamaShape,
    generator: torch.Generator,
) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dims in names:
        end = offset + _numel(dims) * BF16_BYTES
        header[name] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, dims in names:
            for chunk in _values(name, dims, shape.std, generator):
                f.write(chunk.view(torch.int16).numpy().tobytes())


def _values(
    name: str, dims: tuple[int, ...], std: float, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """The tensor's bf16 values, flat, a chunk at a time."""
    total = _numel(dims)
    if name.endswith("norm.weight"):
        yield torch.ones(total, dtype=torch.bfloat16)
        return
    for start in range(0, total, CHUNK_ELEMENTS):
        n = min(CHUNK_ELEMENTS, total - start)
        yield (torch.randn(n, generator=generator) * std).to(torch.bfloat16)
