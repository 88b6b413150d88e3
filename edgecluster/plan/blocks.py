"""Sizes of one agent's blocks and KV cache, from the model config and its shard.

A layer is two blocks (model_config.ATTN, model_config.MLP). An agent's attention
block holds its q, k, v rows (qkv_weight), o's matching input columns, the input norm
and the biases the config has; its MLP block holds gate and up rows, down's matching
columns, the post-attention norm and biases. The output biases (o, down) live with the
one agent whose ShardSpec has `holds_output_bias`. A block the agent has no share of
(no heads, no columns, no output bias) is empty: 0 elements, not stored.
"""

from __future__ import annotations

from edgecluster.model_config import ModelConfig
from edgecluster.types import ShardSpec


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


def shard_block_bytes(cfg: ModelConfig, spec: ShardSpec, bytes_per_element: int) -> tuple[int, int]:
    """(attention, MLP) bytes of one layer's blocks of `spec` in storage dtype."""
    attn = attention_block_elements(
        cfg,
        num_q_heads=spec.num_q_heads,
        num_kv_heads=spec.num_kv_heads,
        holds_output_bias=spec.holds_output_bias,
    )
    mlp = mlp_block_elements(
        cfg, num_cols=spec.num_mlp_cols, holds_output_bias=spec.holds_output_bias
    )
    return attn * bytes_per_element, mlp * bytes_per_element


def shard_weight_bytes(cfg: ModelConfig, spec: ShardSpec, bytes_per_element: int) -> int:
    """Bytes of all of `spec`'s blocks, every layer, in storage dtype."""
    return cfg.num_layers * sum(shard_block_bytes(cfg, spec, bytes_per_element))


def kv_cache_bytes(
    cfg: ModelConfig, *, num_kv_heads: int, num_tokens: int, bytes_per_element: int
) -> int:
    """KV cache for `num_kv_heads` heads of every layer, `num_tokens` positions (summed
    over the sequences held: the KV budget)."""
    return 2 * cfg.num_layers * num_kv_heads * cfg.head_dim * num_tokens * bytes_per_element


def full_model_layer_bytes(cfg: ModelConfig, bytes_per_element: int) -> int:
    """Bytes of every layer's blocks unsharded (what one agent holding it all stores)."""
    attn = attention_block_elements(
        cfg, num_q_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, holds_output_bias=True
    )
    mlp = mlp_block_elements(cfg, num_cols=cfg.intermediate_size, holds_output_bias=True)
    return cfg.num_layers * (attn + mlp) * bytes_per_element
