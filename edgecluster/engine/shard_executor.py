"""An agent's part of every layer: attention on its heads, MLP on its columns.

Each call takes the full hidden state h [T, H] (the residual stream, identical on
every rank) and returns this agent's partial output [T, H]; the star allreduce adds
the partials of all agents to the residual. A packed step carries several
sequences: `segments` rows are (seq_id, start_pos, num_tokens) in token order.
The executor knows nothing about tokens, sampling or the network.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from edgecluster.engine.kv_cache import KVCache
from edgecluster.engine.rope import RotaryTable, apply_rotary
from edgecluster.model_config import ATTN, MLP, ModelConfig
from edgecluster.types import ShardSpec


class WeightSource(Protocol):
    """Gives the tensors of a block while compute needs them (resident or streamed)."""

    def acquire(self, layer: int, kind: str) -> dict[str, torch.Tensor]: ...

    def release(self, layer: int, kind: str) -> None: ...


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm: normalize in float32, scale in the weight's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class ShardExecutor:
    def __init__(
        self,
        cfg: ModelConfig,
        spec: ShardSpec,
        weights: WeightSource,
        dtype: torch.dtype,
        max_context: int,
    ) -> None:
        self.cfg, self.spec, self.weights, self.dtype = cfg, spec, weights, dtype
        self.rotary = RotaryTable(cfg, dtype, max_context)
        self.kv = KVCache(cfg.num_layers, spec.num_kv_heads, cfg.head_dim, dtype)
        group = cfg.group_size
        q_heads = torch.arange(spec.q_head_start, spec.q_head_end)
        # local KV head read by each local query head
        self._kv_index = q_heads // group - spec.kv_head_start
        self._uniform_gqa = spec.num_q_heads == spec.num_kv_heads * group
        self._split = (
            spec.num_q_heads * cfg.head_dim,
            spec.num_kv_heads * cfg.head_dim,
            spec.num_kv_heads * cfg.head_dim,
        )

    def attention(self, layer: int, h: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        """Partial attention output [T, H] of this agent's heads."""
        if self.spec.num_q_heads == 0:
            return torch.zeros_like(h)
        w = self.weights.acquire(layer, ATTN)
        try:
            x = rms_norm(h, w["input_norm"], self.cfg.rms_norm_eps)
            qkv = F.linear(x, w["qkv_weight"], w.get("qkv_bias"))  # [T, (nq+2nkv)*hd]
            out = self._attend(layer, qkv, segments)  # [T, nq*hd]
            return F.linear(out, w["o_weight"], w.get("o_bias"))
        finally:
            self.weights.release(layer, ATTN)

    def _attend(self, layer: int, qkv: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        hd, total = self.cfg.head_dim, qkv.shape[0]
        q, k, v = qkv.split(self._split, dim=-1)
        q, k, v = q.view(total, -1, hd), k.view(total, -1, hd), v.view(total, -1, hd)
        positions = _positions(segments)
        cos, sin = self.rotary.lookup(positions)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        outputs, offset = [], 0
        for seq_id, start, count in segments.tolist():
            sl = slice(offset, offset + count)
            keys, values = self.kv.update(
                seq_id, layer, start, k[sl].transpose(0, 1), v[sl].transpose(0, 1)
            )  # [nkv, start+count, hd]
            outputs.append(self._sdpa(q[sl].transpose(0, 1), keys, values, start))
            offset += count
        return torch.cat(outputs, dim=0) if len(outputs) > 1 else outputs[0]

    def _sdpa(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int
    ) -> torch.Tensor:
        """q [nq, t, hd], keys/values [nkv, L, hd] -> [t, nq*hd], causal from `start`."""
        t, length = q.shape[1], keys.shape[1]
        if not self._uniform_gqa:  # query heads of partial groups: gather their KV heads
            keys, values = keys[self._kv_index], values[self._kv_index]
        mask = None
        if t > 1:
            rows = torch.arange(start, start + t)[:, None]
            mask = torch.arange(length)[None, :] <= rows  # [t, L]
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, enable_gqa=self._uniform_gqa
        )
        return out.transpose(0, 1).reshape(t, -1)

    def mlp(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Partial MLP output [T, H] of this agent's intermediate columns."""
        if self.spec.num_mlp_cols == 0:
            return torch.zeros_like(h)
        w = self.weights.acquire(layer, MLP)
        try:
            x = rms_norm(h, w["post_norm"], self.cfg.rms_norm_eps)
            gate, up = F.linear(x, w["gate_up_weight"], w.get("gate_up_bias")).chunk(2, dim=-1)
            return F.linear(F.silu(gate) * up, w["down_weight"], w.get("down_bias"))
        finally:
            self.weights.release(layer, MLP)


def _positions(segments: torch.Tensor) -> torch.Tensor:
    """Token positions [T] of a packed step from its (seq_id, start, count) rows."""
    return torch.cat([torch.arange(s, s + c) for _, s, c in segments.tolist()])
