"""Weight formats: how a matrix is stored in a block, on disk, on the wire and in memory.

`--weights` picks one for every layer matrix (qkv, o, gate_up, down) and the LM head;
norms and biases stay in the compute dtype.

fp32, bf16  `NAME` [out, in] in that dtype.
int8        `NAME.int8` [out, in] int8 and `NAME.scale` [out] float32:
            w = q * scale, one scale per output row (symmetric, per channel).
int4        `NAME.int4` [out, in/2] uint8, two columns a byte (even column in the
            low nibble), `NAME.scale` and `NAME.min` [out, in/g] float32: w = q * scale
            + min for q in 0..15, one (scale, min) per group of g input columns
            (GGUF's Q4_1 layout, so its blocks repack without rounding).

The stored forms are plain tensors any reader understands; `engine.linear` turns them
into what the CPU kernels want when a shard is loaded. Quantization is per block, after
slicing: an agent's columns are quantized on their own.
"""

from __future__ import annotations

import torch

WEIGHT_MODES = ("fp32", "bf16", "int8", "int4")
QUANTIZED_MODES = ("int8", "int4")
DENSE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
INT4_GROUP = 32  # input columns per (scale, min); GGUF Q4_0/Q4_1 use 32 as well
INT8, INT4, SCALE, MIN = ".int8", ".int4", ".scale", ".min"


def check_mode(mode: str) -> str:
    if mode not in WEIGHT_MODES:
        raise ValueError(f"weights {mode!r}: choose one of {', '.join(WEIGHT_MODES)}")
    return mode


def int4_group(in_features: int) -> int:
    """The group size for a matrix of `in_features` columns: 32 where it divides them,
    else the largest even divisor below 32 (tiny test models), else the whole row."""
    for g in range(INT4_GROUP, 1, -1):
        if in_features % g == 0 and g % 2 == 0:
            return g
    raise ValueError(f"int4 weights need an even number of input columns, got {in_features}")


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (q int8 [out, in], scale float32 [out]); w ~= q * scale."""
    w = w.float()
    if not w.shape[1]:  # an agent with no columns of this matrix
        return torch.zeros(w.shape, dtype=torch.int8), torch.ones(w.shape[0])
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def quantize_int4(
    w: torch.Tensor, group: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [out, in] -> (packed uint8 [out, in/2], scale, min float32 [out, in/g]):
    asymmetric, w ~= q * scale + min with q in 0..15 per group of g columns."""
    out, cols = w.shape
    group = group or int4_group(cols)
    if cols % group:
        raise ValueError(f"{cols} input columns are not a multiple of the int4 group {group}")
    g = w.float().reshape(out, cols // group, group)
    low, high = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=1e-12)
    q = torch.round((g - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return pack_int4(q.reshape(out, cols)), scale.contiguous(), low.contiguous()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q uint8 [out, in] in 0..15 -> [out, in/2], the even column in the low nibble."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[out, in/2] uint8 -> q [out, in] uint8 in 0..15."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    q = unpack_int4(packed).float()
    out, cols = q.shape
    group = cols // scale.shape[1]
    g = q.reshape(out, -1, group) * scale[..., None] + low[..., None]
    return g.reshape(out, cols)


def quantize_matrix(name: str, w: torch.Tensor, mode: str) -> dict[str, torch.Tensor]:
    """The stored tensors of matrix `name` in `mode` (see the module doc)."""
    if mode in DENSE_DTYPES:
        return {name: w.to(DENSE_DTYPES[mode]).contiguous()}
    if mode == "int8":
        q, scale = quantize_int8(w)
        return {name + INT8: q, name + SCALE: scale}
    if mode == "int4":
        packed, scale, low = quantize_int4(w)
        return {name + INT4: packed, name + SCALE: scale, name + MIN: low}
    raise ValueError(check_mode(mode))


def stored_matrix_names(name: str, mode: str) -> tuple[str, ...]:
    return {
        "int8": (name + INT8, name + SCALE),
        "int4": (name + INT4, name + SCALE, name + MIN),
    }.get(mode, (name,))


def matrix_shapes(
    name: str, out: int, cols: int, mode: str
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of each stored tensor of an [out, cols] matrix (no data)."""
    if mode in DENSE_DTYPES:
        return {name: ((out, cols), DENSE_DTYPES[mode])}
    if mode == "int8":
        return {name + INT8: ((out, cols), torch.int8), name + SCALE: ((out,), torch.float32)}
    groups = cols // int4_group(cols) if cols else 0
    return {
        name + INT4: ((out, cols // 2), torch.uint8),
        name + SCALE: ((out, groups), torch.float32),
        name + MIN: ((out, groups), torch.float32),
    }


def stored_mode(tensors: dict[str, torch.Tensor], name: str) -> str:
    """Which mode matrix `name` is stored in within a block's tensors."""
    if name + INT8 in tensors:
        return "int8"
    if name + INT4 in tensors:
        return "int4"
    if name in tensors:
        return "bf16" if tensors[name].dtype == torch.bfloat16 else "fp32"
    raise KeyError(f"the block holds no matrix {name!r}")


def dequantize_matrix(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """Matrix `name` as float32 [out, in], whatever its stored mode."""
    mode = stored_mode(tensors, name)
    if mode == "int8":
        return dequantize_int8(tensors[name + INT8], tensors[name + SCALE])
    if mode == "int4":
        return dequantize_int4(tensors[name + INT4], tensors[name + SCALE], tensors[name + MIN])
    return tensors[name].float()
