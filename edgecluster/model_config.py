"""The engine's view of a decoder-only model of the Llama family.

Read from a Hugging Face `config.json` dict (Llama 2/3, Mistral, SmolLM2, TinyLlama,
Qwen2). Also the contract between the weight slicer and the engine: block names and
the tensor names inside each block (see BLOCK_* below).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# Each layer is two blocks; a block is the unit of storage, transfer and streaming.
ATTN, MLP = "attn", "mlp"
# Tensor names inside an attention block: q rows, then k rows, then v rows of this
# agent's heads (HF row order within each), and o's matching input columns.
ATTN_TENSORS = ("input_norm", "qkv_weight", "qkv_bias", "o_weight", "o_bias")
# Tensor names inside an MLP block: gate rows then up rows of this agent's columns.
MLP_TENSORS = ("post_norm", "gate_up_weight", "gate_up_bias", "down_weight", "down_bias")


def block_name(layer: int, kind: str) -> str:
    return f"layers.{layer:03d}.{kind}"


def parse_block_name(name: str) -> tuple[int, str]:
    parts = name.split(".")
    if len(parts) != 3 or parts[0] != "layers" or parts[2] not in (ATTN, MLP):
        raise ValueError(f"not a block name: {name!r} (expected layers.NNN.attn|mlp)")
    return int(parts[1]), parts[2]


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q, k, v (Qwen2; Llama's flag also biases o)
    o_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 4096

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {self.model_type!r} is not supported; edgecluster serves "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} checkpoints"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads {self.num_heads} is not a multiple of "
                f"num_key_value_heads {self.num_kv_heads}"
            )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("default", "llama3", "linear"):
                raise ValueError(
                    f"rope_scaling type {kind!r} is not supported (default, linear, llama3 are)"
                )

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def layer_params(self) -> int:
        """Parameters of one layer (without norms)."""
        h, hd = self.hidden_size, self.head_dim
        attn = h * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        return attn + 3 * h * self.intermediate_size

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        model_type = d.get("model_type", "")
        hidden = int(d["hidden_size"])
        heads = int(d["num_attention_heads"])
        rope = d.get("rope_parameters") or {}
        rope_theta = float(d.get("rope_theta", rope.get("rope_theta", 10000.0)))
        scaling = d.get("rope_scaling")
        if scaling is None and rope and rope.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
            scaling = None
        is_qwen2 = model_type == "qwen2"
        attention_bias = bool(d.get("attention_bias", False)) or is_qwen2
        return cls(
            model_type=model_type,
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or hidden // heads),
            vocab_size=int(d["vocab_size"]),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=dict(scaling) if scaling else None,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            o_bias=attention_bias and not is_qwen2,
            mlp_bias=bool(d.get("mlp_bias", False)),
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("model config JSON must be an object")
        return cls(**data)
