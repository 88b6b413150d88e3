"""Sizes of one agent's blocks and KV cache, from the model config and its shard.

A layer is two blocks (model_config.ATTN, model_config.MLP). An agent's attention
block holds its q, k, v rows (qkv_weight), o's matching input columns, the input norm
and the biases the config has; its MLP block holds gate and up rows, down's matching
columns, the post-attention norm and biases. The output biases (o, down) live with the
one agent whose ShardSpec has `holds_output_bias`. A block the agent has no share of
(no heads, no columns, no output bias) is empty: 0 elements, not stored.

Bytes: norms and biases take `bytes_per_element` each; the matrices too, unless a
`weights_mode` (`weights.quant`: fp32, bf16, int8, int4) says how they are stored, as
`weights.slicing.stored_block_shapes` lays them out (int8 per-row scales, int4 nibbles
with a scale and a minimum per group of columns).
"""

from __future__ import annotations

import math

from edgecluster.model_config import ModelConfig
from edgecluster.types import ShardSpec
from edgecluster.weights import quant


def attention_block_elements(
    cfg: ModelConfig, *, num_q_heads: int, num_kv_heads: int, holds_output_bias: bool
) -> int:
    """Elements of one layer's attention block for an agent with these heads."""
    output_bias = cfg.hidden_size if cfg.o_bias and holds_output_bias else 0
    if num_q_heads == 0 and num_kv_heads == 0 and output_bias == 0:
        return 0
    qkv_rows = (num_q_heads + 2 * num_kv_heads) * cfg.head_dim
    qkv_bias = qkv_rows if cfg.attention_bias else 0
    o_cols = num_q_heads * cfg.head_dim
    return (qkv_rows + o_cols) * cfg.hidden_size + qkv_bias + output_bias + cfg.hidden_size


def mlp_block_elements(cfg: ModelConfig, *, num_cols: int, holds_output_bias: bool) -> int:
    """Elements of one layer's MLP block for an agent with these intermediate columns."""
    output_bias = cfg.hidden_size if cfg.mlp_bias and holds_output_bias else 0
    if num_cols == 0 and output_bias == 0:
        return 0
    gate_up_bias = 2 * num_cols if cfg.mlp_bias else 0
    return 3 * cfg.hidden_size * num_cols + gate_up_bias + output_bias + cfg.hidden_size


def matrix_bytes(out: int, cols: int, bytes_per_element: int, weights_mode: str | None) -> int:
    """Bytes of an [out, cols] matrix stored in `weights_mode` (None: dense at
    `bytes_per_element`)."""
    if weights_mode is None:
        return out * cols * bytes_per_element
    stored = quant.matrix_shapes("w", out, cols, weights_mode)
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in stored.values())


def attention_block_bytes(
    cfg: ModelConfig,
    *,
    num_q_heads: int,
    num_kv_heads: int,
    holds_output_bias: bool,
    bytes_per_element: int,
    weights_mode: str | None = None,
) -> int:
    """Bytes of one layer's attention block for an agent with these heads, as stored."""
    elements = attention_block_elements(
        cfg, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, holds_output_bias=holds_output_bias
    )
    if weights_mode is None or elements == 0:
        return elements * bytes_per_element
    h, qkv_rows = cfg.hidden_size, (num_q_heads + 2 * num_kv_heads) * cfg.head_dim
    o_cols = num_q_heads * cfg.head_dim
    dense = elements - (qkv_rows + o_cols) * h  # norm and biases
    return (
        dense * bytes_per_element
        + matrix_bytes(qkv_rows, h, bytes_per_element, weights_mode)
        + matrix_bytes(h, o_cols, bytes_per_element, weights_mode)
    )


def mlp_block_bytes(
    cfg: ModelConfig,
    *,
    num_cols: int,
    holds_output_bias: bool,
    bytes_per_element: int,
    weights_mode: str | None = None,
    stored_when_empty: bool = False,
) -> int:
    """Bytes of one layer's MLP block for an agent with these columns, as stored.
    `stored_when_empty` counts an empty share's norm and scales (the planner's fixed
    cost per agent) instead of 0."""
    elements = mlp_block_elements(cfg, num_cols=num_cols, holds_output_bias=holds_output_bias)
    if elements == 0 and not stored_when_empty:
        return 0
    h = cfg.hidden_size
    output_bias = h if cfg.mlp_bias and holds_output_bias else 0
    dense = (2 * num_cols if cfg.mlp_bias else 0) + output_bias + h  # biases, norm
    return (
        dense * bytes_per_element
        + matrix_bytes(2 * num_cols, h, bytes_per_element, weights_mode)
        + matrix_bytes(h, num_cols, bytes_per_element, weights_mode)
    )


def shard_block_bytes(
    cfg: ModelConfig, spec: ShardSpec, bytes_per_element: int, weights_mode: str | None = None
) -> tuple[int, int]:
    """(attention, MLP) bytes of one layer's blocks of `spec` as stored: matrices in
    `weights_mode` (None: dense), everything else at `bytes_per_element`."""
    attn = attention_block_bytes(
        cfg,
        num_q_heads=spec.num_q_heads,
        num_kv_heads=spec.num_kv_heads,
        holds_output_bias=spec.holds_output_bias,
        bytes_per_element=bytes_per_element,
        weights_mode=weights_mode,
    )
    mlp = mlp_block_bytes(
        cfg,
        num_cols=spec.num_mlp_cols,
        holds_output_bias=spec.holds_output_bias,
        bytes_per_element=bytes_per_element,
        weights_mode=weights_mode,
    )
    return attn, mlp


def shard_weight_bytes(
    cfg: ModelConfig, spec: ShardSpec, bytes_per_element: int, weights_mode: str | None = None
) -> int:
    """Bytes of all of `spec`'s blocks, every layer, as stored."""
    return cfg.num_layers * sum(shard_block_bytes(cfg, spec, bytes_per_element, weights_mode))


def mlp_column_unit(cfg: ModelConfig, weights_mode: str | None) -> int:
    """MLP columns are given to agents in multiples of this: for int4 the group size
    (32 where the model's columns allow), so that every agent's down_proj columns are
    whole groups and its blocks quantize exactly as the whole matrix would; else 1."""
    if weights_mode != "int4":
        return 1
    return quant.int4_group(cfg.intermediate_size)


def kv_cache_bytes(
    cfg: ModelConfig, *, num_kv_heads: int, num_tokens: int, bytes_per_element: int
) -> int:
    """KV cache for `num_kv_heads` heads of every layer, `num_tokens` positions (summed
    over the sequences held: the KV budget)."""
    return 2 * cfg.num_layers * num_kv_heads * cfg.head_dim * num_tokens * bytes_per_element


def full_model_layer_bytes(
    cfg: ModelConfig, bytes_per_element: int, weights_mode: str | None = None
) -> int:
    """Bytes of every layer's blocks unsharded (what one agent holding it all stores)."""
    whole = ShardSpec(
        q_head_start=0,
        q_head_end=cfg.num_heads,
        kv_head_start=0,
        kv_head_end=cfg.num_kv_heads,
        mlp_col_start=0,
        mlp_col_end=cfg.intermediate_size,
        holds_output_bias=True,
    )
    return shard_weight_bytes(cfg, whole, bytes_per_element, weights_mode)
