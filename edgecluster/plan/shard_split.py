"""How heads and MLP columns are cut into per-agent shards under memory caps.

Pure helpers of plan_tensor_parallel (see tensor_parallel.py for the policy): sizes of
shards in bytes, the most heads or columns an agent's room holds, and the ranges.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edgecluster.model_config import ModelConfig
from edgecluster.plan.blocks import (
    attention_block_bytes,
    kv_cache_bytes,
    mlp_block_bytes,
    mlp_column_unit,
    shard_block_bytes,
)
from edgecluster.plan.split import split_units
from edgecluster.types import ShardSpec


@dataclass(frozen=True)
class ShardSizing:
    cfg: ModelConfig
    storage_bpe: int
    compute_bpe: int
    kv_tokens: int  # KV positions reserved per agent (the KV budget)
    kv_bpe: int = 0  # bytes per KV element; 0: compute_bpe
    weights_mode: str | None = None  # how matrices are stored (weights.quant); None: dense

    def __post_init__(self) -> None:
        if self.storage_bpe < 1 or self.compute_bpe < 1:
            raise ValueError(
                f"bytes per element must be >= 1, got storage {self.storage_bpe}, "
                f"compute {self.compute_bpe}"
            )
        if self.kv_tokens < 1:
            raise ValueError(f"the KV budget must be >= 1 token, got {self.kv_tokens}")
        if self.kv_bpe < 0:
            raise ValueError(f"KV bytes per element must be >= 1, got {self.kv_bpe}")

    def kv(self, num_kv_heads: int) -> int:
        """The KV cache these heads reach when the whole budget is held."""
        return kv_cache_bytes(
            self.cfg,
            num_kv_heads=num_kv_heads,
            num_tokens=self.kv_tokens,
            bytes_per_element=self.kv_bpe or self.compute_bpe,
        )

    def attention(self, num_q_heads: int, num_kv_heads: int) -> int:
        """Bytes of these heads' attention blocks, every layer, counting the output bias."""
        layer = attention_block_bytes(
            self.cfg,
            num_q_heads=num_q_heads,
            num_kv_heads=num_kv_heads,
            holds_output_bias=True,
            bytes_per_element=self.storage_bpe,
            weights_mode=self.weights_mode,
        )
        return self.cfg.num_layers * layer

    def mlp(self, num_cols: int) -> int:
        """Bytes of an MLP share of `num_cols` columns, every layer, counting the output
        bias, the norm and (quantized) the scales an empty share would still store."""
        layer = mlp_block_bytes(
            self.cfg,
            num_cols=num_cols,
            holds_output_bias=True,
            bytes_per_element=self.storage_bpe,
            weights_mode=self.weights_mode,
            stored_when_empty=True,
        )
        return self.cfg.num_layers * layer

    def need(self, spec: ShardSpec) -> int:
        """Weights and KV cache of `spec`."""
        layer = sum(shard_block_bytes(self.cfg, spec, self.storage_bpe, self.weights_mode))
        return self.cfg.num_layers * layer + self.kv(spec.num_kv_heads)


def split_attention(
    sizing: ShardSizing, fractions: Sequence[float], rooms: Sequence[int]
) -> list[tuple[int, int]]:
    """Each agent's q head range: whole KV groups while agents <= KV heads, else heads."""
    cfg = sizing.cfg
    unit_heads = cfg.group_size if len(rooms) <= cfg.num_kv_heads else 1
    num_units = cfg.num_heads // unit_heads
    caps = [attention_cap(sizing, room, unit_heads, num_units) for room in rooms]
    ranges, start = [], 0
    for count in split_units(num_units, fractions, caps):
        ranges.append((start * unit_heads, (start + count) * unit_heads))
        start += count
    return ranges


def attention_cap(sizing: ShardSizing, room: int, unit_heads: int, num_units: int) -> int:
    """Most units whose attention blocks and KV cache fit `room`, wherever they start."""
    group = sizing.cfg.group_size
    cap = 0
    for units in range(1, num_units + 1):
        num_q = units * unit_heads
        touched = units if unit_heads == group else -(-(num_q + group - 1) // group)
        num_kv = min(sizing.cfg.num_kv_heads, touched)
        if sizing.attention(num_q, num_kv) + sizing.kv(num_kv) > room:
            break
        cap = units
    return cap


def kv_range(cfg: ModelConfig, q_start: int, q_end: int) -> tuple[int, int]:
    """The KV groups that query heads [q_start, q_end) read."""
    if q_start == q_end:
        return q_start // cfg.group_size, q_start // cfg.group_size
    return q_start // cfg.group_size, -(-q_end // cfg.group_size)


def mlp_caps(
    sizing: ShardSizing, rooms: Sequence[int], heads: Sequence[tuple[int, int]]
) -> list[int]:
    """Most MLP columns each agent can hold beside its attention blocks and KV cache."""
    cfg = sizing.cfg
    fixed = sizing.mlp(0)
    per_col = -(-(sizing.mlp(cfg.intermediate_size) - fixed) // cfg.intermediate_size)
    caps = []
    for room, (q_start, q_end) in zip(rooms, heads, strict=True):
        kv_start, kv_end = kv_range(cfg, q_start, q_end)
        num_kv = kv_end - kv_start
        left = room - sizing.attention(q_end - q_start, num_kv) - sizing.kv(num_kv) - fixed
        caps.append(max(0, min(cfg.intermediate_size, left // per_col)))
    return caps


def split_mlp_columns(
    sizing: ShardSizing, shares: Sequence[float], caps: Sequence[int]
) -> list[int]:
    """Each agent's count of MLP columns, in multiples of `mlp_column_unit` (int4: whole
    quantization groups), in proportion to `shares` under `caps`."""
    unit = mlp_column_unit(sizing.cfg, sizing.weights_mode)
    units = split_units(sizing.cfg.intermediate_size // unit, shares, [c // unit for c in caps])
    return [count * unit for count in units]


def build_specs(
    cfg: ModelConfig, heads: Sequence[tuple[int, int]], cols: Sequence[int]
) -> list[ShardSpec]:
    """ShardSpecs from head ranges and column counts; the output biases go to the first
    agent with both heads and columns (else the first with either)."""
    both = [i for i, ((q0, q1), c) in enumerate(zip(heads, cols, strict=True)) if q1 > q0 and c]
    either = [i for i, ((q0, q1), c) in enumerate(zip(heads, cols, strict=True)) if q1 > q0 or c]
    holder = (both or either)[0]
    specs, col_start = [], 0
    for i, ((q_start, q_end), num_cols) in enumerate(zip(heads, cols, strict=True)):
        kv_start, kv_end = kv_range(cfg, q_start, q_end)
        specs.append(
            ShardSpec(
                q_head_start=q_start,
                q_head_end=q_end,
                kv_head_start=kv_start,
                kv_head_end=kv_end,
                mlp_col_start=col_start,
                mlp_col_end=col_start + num_cols,
                holds_output_bias=i == holder,
            )
        )
        col_start += num_cols
    return specs
