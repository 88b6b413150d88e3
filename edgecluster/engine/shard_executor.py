"""An agent's part of every layer: attention on its heads, MLP on its columns.

Each call takes the full hidden state h [T, H] (the residual stream, identical on
every rank) and returns this agent's partial output [T, H]; the star allreduce adds
the partials of all agents to the residual. A packed step carries several
sequences: `segments` rows are (seq_id, start_pos, num_tokens) in token order.
The executor knows nothing about tokens, sampling or the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from edgecluster.engine.kv_cache import KVCache
from edgecluster.engine.rope import RotaryTable, apply_rotary
from edgecluster.model_config import ATTN, MLP, ModelConfig
from edgecluster.types import ShardSpec


class WeightSource(Protocol):
    """Gives a block while compute needs it (resident or streamed), prepared by
    `engine.linear.prepare_block`: its matrices as Linear layers, its norms as tensors."""

    def acquire(self, layer: int, kind: str) -> dict[str, Any]: ...

    def release(self, layer: int, kind: str) -> None: ...


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm: normalize in float32, scale in the weight's dtype."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)  # one fused op, same math
    xf = F.rms_norm(x.float(), weight.shape, None, eps)
    return weight * xf.to(x.dtype)


@dataclass(frozen=True)
class StepContext:
    """What every layer of one step shares: its segments and their rotary tables."""

    segments: list[tuple[int, int, int]]  # (seq_id, start_pos, num_tokens) in token order
    cos: torch.Tensor  # [T, 1, head_dim]
    sin: torch.Tensor  # signed (see RotaryTable)


class ShardExecutor:
    def __init__(
        self,
        cfg: ModelConfig,
        spec: ShardSpec,
        weights: WeightSource,
        dtype: torch.dtype,
        max_context: int,
        *,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        self.cfg, self.spec, self.weights, self.dtype = cfg, spec, weights, dtype
        self.rotary = RotaryTable(cfg, dtype, max_context)
        self.kv = KVCache(
            cfg.num_layers, spec.num_kv_heads, cfg.head_dim, kv_dtype or dtype, compute_dtype=dtype
        )
        group = cfg.group_size
        q_heads = torch.arange(spec.q_head_start, spec.q_head_end)
        # local KV head read by each local query head
        self._kv_index = q_heads // group - spec.kv_head_start
        self._uniform_gqa = spec.num_q_heads == spec.num_kv_heads * group
        self._scale = cfg.head_dim**-0.5
        self._zero = torch.zeros(1, 1, 1, dtype=dtype)  # baddbmm's ignored input (beta=0)

    def begin_step(self, segments: torch.Tensor) -> StepContext:
        """Decodes the step's segments [n, 3] once for all its layers."""
        rows = [(int(a), int(b), int(c)) for a, b, c in segments.tolist()]
        positions = torch.cat([torch.arange(start, start + n) for _, start, n in rows])
        cos, sin = self.rotary.lookup(positions)
        return StepContext(rows, cos, sin)

    def attention(self, layer: int, h: torch.Tensor, step: StepContext) -> torch.Tensor:
        """Partial attention output [T, H] of this agent's heads."""
        if self.spec.num_q_heads == 0:
            return torch.zeros_like(h)
        w = self.weights.acquire(layer, ATTN)
        try:
            x = rms_norm(h, w["input_norm"], self.cfg.rms_norm_eps)
            qkv = w["qkv"](x)  # [T, (nq+2nkv)*hd]
            out = self._attend(layer, qkv, step)  # [T, nq*hd]
            return w["o"](out)
        finally:
            self.weights.release(layer, ATTN)

    def _attend(self, layer: int, qkv: torch.Tensor, step: StepContext) -> torch.Tensor:
        total, nq, nkv = qkv.shape[0], self.spec.num_q_heads, self.spec.num_kv_heads
        heads = qkv.view(total, nq + 2 * nkv, self.cfg.head_dim)
        qk = apply_rotary(heads[:, : nq + nkv], step.cos, step.sin)  # q and k rotate together
        q, k, v = qk[:, :nq], qk[:, nq:], heads[:, nq + nkv :]
        outputs, offset = [], 0
        for seq_id, start, count in step.segments:
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
        if t == 1:  # decode: three small kernels, a third of SDPA's GQA path on CPU
            heads = keys.shape[0]
            scores = torch.baddbmm(
                self._zero, q.view(heads, -1, q.shape[-1]), keys.transpose(1, 2),
                beta=0.0, alpha=self._scale,
            )  # fmt: skip
            out = torch.bmm(torch.softmax(scores, dim=-1), values)  # [heads, group, hd]
            return out.view(1, -1)
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
            gate, up = w["gate_up"](x).chunk(2, dim=-1)
            return w["down"](F.silu(gate) * up)
        finally:
            self.weights.release(layer, MLP)
