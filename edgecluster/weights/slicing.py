"""Cut an agent's blocks out of a checkpoint, following the block contract.

The contract is `edgecluster.model_config` (ATTN_TENSORS, MLP_TENSORS); a block is
one half-layer of one agent's share (`ShardSpec`):

attn  input_norm  [H]                      replicated
      qkv_weight  [(nq + 2 nkv) hd, H]     q rows of heads [q0, q1), then k rows and
                                           v rows of kv heads [kv0, kv1), HF row order
      qkv_bias    [(nq + 2 nkv) hd]        when cfg.attention_bias
      o_weight    [H, nq hd]               o_proj input columns of the same q heads
      o_bias      [H]                      when cfg.o_bias and spec.holds_output_bias
mlp   post_norm   [H]                      replicated
      gate_up_weight [2 nc, H]             gate rows [c0, c1), then up rows [c0, c1)
      gate_up_bias   [2 nc]                when cfg.mlp_bias
      down_weight [H, nc]                  down_proj input columns [c0, c1)
      down_bias   [H]                      when cfg.mlp_bias and spec.holds_output_bias

Optional tensors are absent from the dict, not zero. Empty shares give zero-size
tensors with the right trailing dims. Reads are lazy (`Checkpoint.rows/cols`), so
slicing touches only this agent's bytes. `block_shapes`/`block_bytes` give the same
layout without reading anything (planners size plans with them), and
`tensor_digest` is the checksum a block carries across the network.

With `weights=MODE` (`weights.quant`) the four matrices (the `*_weight` tensors
above) are stored in that mode after slicing (an agent's columns are quantized on
their own, so an int4 group never straddles two agents); norms and biases stay in
the block's dense dtype. `stored_block_shapes` gives what such a block stores.
"""

from __future__ import annotations

import hashlib
import json
import math

import torch

from edgecluster.model_config import ATTN, MLP, ModelConfig
from edgecluster.types import ShardSpec
from edgecluster.weights import quant
from edgecluster.weights.checkpoint import EMBED, LM_HEAD, Checkpoint

Shape = tuple[int, ...]
MATRICES = ("qkv_weight", "o_weight", "gate_up_weight", "down_weight")  # stored per mode


def block_shapes(cfg: ModelConfig, spec: ShardSpec, kind: str) -> dict[str, Shape]:
    """Name -> shape of every tensor in one block of this share (no reads)."""
    check_spec(cfg, spec)
    h, hd = cfg.hidden_size, cfg.head_dim
    if kind == ATTN:
        qkv = (spec.num_q_heads + 2 * spec.num_kv_heads) * hd
        shapes: dict[str, Shape] = {"input_norm": (h,), "qkv_weight": (qkv, h)}
        if cfg.attention_bias:
            shapes["qkv_bias"] = (qkv,)
        shapes["o_weight"] = (h, spec.num_q_heads * hd)
        if cfg.o_bias and spec.holds_output_bias:
            shapes["o_bias"] = (h,)
        return shapes
    if kind == MLP:
        nc = spec.num_mlp_cols
        shapes = {"post_norm": (h,), "gate_up_weight": (2 * nc, h)}
        if cfg.mlp_bias:
            shapes["gate_up_bias"] = (2 * nc,)
        shapes["down_weight"] = (h, nc)
        if cfg.mlp_bias and spec.holds_output_bias:
            shapes["down_bias"] = (h,)
        return shapes
    raise ValueError(f"block kind {kind!r} is not one of {ATTN!r}, {MLP!r}")


def stored_block_shapes(
    cfg: ModelConfig, spec: ShardSpec, kind: str, dtype: torch.dtype, weights: str | None = None
) -> dict[str, tuple[Shape, torch.dtype]]:
    """Name -> (shape, dtype) of every tensor one block stores: the matrices in
    `weights` (None: in `dtype` like the rest), norms and biases in `dtype`."""
    stored: dict[str, tuple[Shape, torch.dtype]] = {}
    for name, shape in block_shapes(cfg, spec, kind).items():
        if weights is not None and name in MATRICES:
            out, cols = shape
            stored.update(quant.matrix_shapes(name, out, cols, quant.check_mode(weights)))
        else:
            stored[name] = (shape, dtype)
    return stored


def block_bytes(
    cfg: ModelConfig, spec: ShardSpec, kind: str, dtype: torch.dtype, weights: str | None = None
) -> int:
    """Bytes of tensor data in one block as stored (file headers not counted)."""
    stored = stored_block_shapes(cfg, spec, kind, dtype, weights)
    return sum(math.prod(shape) * t.itemsize for shape, t in stored.values())


def slice_block(
    ckpt: Checkpoint,
    cfg: ModelConfig,
    spec: ShardSpec,
    layer: int,
    kind: str,
    dtype: torch.dtype,
    *,
    weights: str | None = None,
) -> dict[str, torch.Tensor]:
    """This share's tensors of one block, contiguous: matrices in `weights` (None: in
    `dtype`), everything else in `dtype`."""
    if not 0 <= layer < cfg.num_layers:
        raise ValueError(f"layer {layer} is outside the model's {cfg.num_layers} layers")
    expected = stored_block_shapes(cfg, spec, kind, dtype, weights)
    raw = _attn(ckpt, cfg, spec, layer) if kind == ATTN else _mlp(ckpt, cfg, spec, layer)
    block: dict[str, torch.Tensor] = {}
    for name, t in raw.items():
        if weights is not None and name in MATRICES:
            block.update(quant.quantize_matrix(name, t, weights))
        else:
            block[name] = t.to(dtype).contiguous()
    got = {n: (tuple(t.shape), t.dtype) for n, t in block.items()}
    assert got == expected, (layer, kind, spec, weights)
    return block


def hub_tensors(ckpt: Checkpoint, cfg: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What the hub holds: `embed` [V, H], `final_norm` [H], `lm_head` [V, H].

    With tied embeddings `lm_head` is the same tensor object as `embed`.
    """
    embed = ckpt.tensor(EMBED).to(dtype).contiguous()
    lm_head = embed if cfg.tie_word_embeddings else ckpt.tensor(LM_HEAD).to(dtype).contiguous()
    final_norm = ckpt.tensor("model.norm.weight").to(dtype).contiguous()
    return {"embed": embed, "final_norm": final_norm, "lm_head": lm_head}


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 hex over (name, dtype, shape, raw bytes) of each tensor, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        meta = {"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
        line = json.dumps(meta, sort_keys=True).encode()
        digest.update(len(line).to_bytes(8, "little") + line)
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def check_spec(cfg: ModelConfig, spec: ShardSpec) -> None:
    """ValueError unless the share's ranges fit the model and its KV heads serve its Q heads."""
    ranges = (
        ("q heads", spec.q_head_start, spec.q_head_end, cfg.num_heads),
        ("kv heads", spec.kv_head_start, spec.kv_head_end, cfg.num_kv_heads),
        ("mlp columns", spec.mlp_col_start, spec.mlp_col_end, cfg.intermediate_size),
    )
    for what, start, end, limit in ranges:
        if not 0 <= start <= end <= limit:
            raise ValueError(f"shard spec {what} [{start}, {end}) do not fit the model's {limit}")
    if spec.num_q_heads:
        g = cfg.group_size
        first, last = spec.q_head_start // g, (spec.q_head_end - 1) // g
        if not spec.kv_head_start <= first <= last < spec.kv_head_end:
            raise ValueError(
                f"shard spec q heads [{spec.q_head_start}, {spec.q_head_end}) need kv heads "
                f"[{first}, {last + 1}), but it holds [{spec.kv_head_start}, {spec.kv_head_end})"
            )


def _attn(
    ckpt: Checkpoint, cfg: ModelConfig, spec: ShardSpec, layer: int
) -> dict[str, torch.Tensor]:
    hd, p = cfg.head_dim, f"model.layers.{layer}.self_attn."
    q0, q1 = spec.q_head_start * hd, spec.q_head_end * hd
    kv0, kv1 = spec.kv_head_start * hd, spec.kv_head_end * hd
    out = {"input_norm": ckpt.tensor(f"model.layers.{layer}.input_layernorm.weight")}
    for part in ("weight", "bias") if cfg.attention_bias else ("weight",):
        out[f"qkv_{part}"] = torch.cat(  # [(nq + 2 nkv) hd, H] or [(nq + 2 nkv) hd]
            [
                ckpt.rows(f"{p}q_proj.{part}", q0, q1),
                ckpt.rows(f"{p}k_proj.{part}", kv0, kv1),
                ckpt.rows(f"{p}v_proj.{part}", kv0, kv1),
            ]
        )
    out["o_weight"] = ckpt.cols(f"{p}o_proj.weight", q0, q1)  # [H, nq hd]
    if cfg.o_bias and spec.holds_output_bias:
        out["o_bias"] = ckpt.tensor(f"{p}o_proj.bias")
    return out


def _mlp(
    ckpt: Checkpoint, cfg: ModelConfig, spec: ShardSpec, layer: int
) -> dict[str, torch.Tensor]:
    c0, c1, p = spec.mlp_col_start, spec.mlp_col_end, f"model.layers.{layer}.mlp."
    out = {"post_norm": ckpt.tensor(f"model.layers.{layer}.post_attention_layernorm.weight")}
    for part in ("weight", "bias") if cfg.mlp_bias else ("weight",):
        gate, up = (
            ckpt.rows(f"{p}gate_proj.{part}", c0, c1),
            ckpt.rows(f"{p}up_proj.{part}", c0, c1),
        )
        out[f"gate_up_{part}"] = torch.cat([gate, up])  # [2 nc, H] or [2 nc]
    out["down_weight"] = ckpt.cols(f"{p}down_proj.weight", c0, c1)  # [H, nc]
    if cfg.mlp_bias and spec.holds_output_bias:
        out["down_bias"] = ckpt.tensor(f"{p}down_proj.bias")
    return out
