"""One linear layer, in whatever form its weights are stored (`weights.quant`).

`make_linear(tensors, name, bias)` turns a block's stored matrix into a callable
x [T, in] -> [T, out], prepared once for the CPU kernel that reads it fastest. The
figures are matrix-vector products of SmolLM2's [3072, 576] gate_up on this project's
2-core AVX2 box, cold in cache (benchmarks/inference.py measures the whole model):

fp32  resident: kept transposed ([in, out], contiguous), computed as x @ w: MKL
      streams it at ~17 GB/s on one core where F.linear on [out, in] gets ~9; a
      single row on several threads is a bmm over slices of the input dimension.
      Streamed blocks (read per token) use F.linear as stored.
bf16  F.linear on [out, in] (oneDNN; it also splits one row across threads).
int8  torch's weight-only kernel (`_weight_int8pack_mm`, as gpt-fast uses it):
      a quarter of fp32's bytes, exact up to the weights' rounding. On AVX2 it is
      ~4x slower than fp32 (benchmarks/kernels.py), so int8 saves memory there, not
      time; fbgemm's dynamic int8 kernel is ~1.7x faster than fp32 but rounds the
      activations and failed the quality bar (see Int8Linear).
int4  torch's `_weight_int4pack_mm_for_cpu` for single rows (packed in memory,
      half of int8's bytes; on AVX2 it is compute-bound, slower than fp32), and a
      dequantized float32 matrix for prompts (the kernel is ~50x slower on many
      rows there).

Every prepared form is numerically the stored matrix: fp32 and bf16 exactly, int8
and int4 up to their quantization (and fbgemm's activation rounding).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from edgecluster.weights import quant


class Linear(Protocol):
    weight_bytes: int  # bytes a product reads (what a token costs in memory traffic)

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def make_linear(
    tensors: dict[str, torch.Tensor],
    name: str,
    bias: torch.Tensor | None = None,
    *,
    resident: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Linear:
    """The linear layer of matrix `name` in `tensors`; `resident` prepares it for reuse
    (a block read once per token is used as stored). `dtype` is the compute dtype."""
    mode = quant.stored_mode(tensors, name)
    if mode == "int8":
        return Int8Linear(tensors[name + quant.INT8], tensors[name + quant.SCALE], bias, resident)
    if mode == "int4":
        return Int4Linear(
            tensors[name + quant.INT4], tensors[name + quant.SCALE], tensors[name + quant.MIN], bias
        )
    dense_bias = None if bias is None else bias.to(dtype)
    return DenseLinear(
        tensors[name].to(dtype), dense_bias, transpose=resident and dtype == torch.float32
    )


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class DenseLinear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, transpose: bool):
        self.out_features = weight.shape[0]
        self.bias = bias
        self.weight_bytes = _nbytes(weight, bias)
        self._transposed = transpose
        # [in, out] for x @ w, else [out, in] for F.linear
        self._w = weight.t().contiguous() if transpose else weight

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` of the weight, [len(index), in] (an embedding lookup)."""
        if self._transposed:
            return self._w.index_select(1, index).t()
        return self._w.index_select(0, index)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self._transposed:
            return F.linear(x, self._w, self.bias)
        parts = torch.get_num_threads()
        if x.shape[0] == 1 and parts > 1 and self._w.shape[0] % parts == 0:
            # One row: MKL's gemv runs on one thread. Cut the input dimension into a
            # batch of `parts` products (a view, no copy) that bmm runs one per thread,
            # then add them up: ~1.45x on 2 cores.
            xs = x.view(parts, 1, -1)
            y = torch.bmm(xs, self._w.view(parts, -1, self._w.shape[1])).sum(dim=0)
        else:
            y = torch.matmul(x, self._w)
        return y if self.bias is None else y.add_(self.bias)


class Int8Linear:
    """Weight-only int8: every row of x is multiplied by the int8 matrix in float32,
    so a row's result never depends on the other rows of its batch, and the only
    rounding is the weights'. (fbgemm's faster dynamic kernel rounds the activations
    to 7 bits with one scale per call: SmolLM2's perplexity tripled, and a request's
    tokens changed with what it was batched with; benchmarks/perplexity.py.)"""

    def __init__(
        self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, resident: bool
    ):
        self.out_features = q.shape[0]
        self.bias = None if bias is None else bias.float()
        self.weight_bytes = _nbytes(q, scale, bias)
        self._q, self._scale = q, scale.float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        if self._q.numel() and x32.shape[0] == 1:
            y = torch.ops.aten._weight_int8pack_mm(x32.contiguous(), self._q, self._scale)
        elif self._q.numel():  # a prompt: torch's kernel is ~100x slower on many rows here
            y = F.linear(x32, self._q.to(torch.float32)).mul_(self._scale)
        else:
            y = x32.new_zeros(x32.shape[0], self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)


class Int4Linear:
    def __init__(
        self,
        packed: torch.Tensor,
        scale: torch.Tensor,
        low: torch.Tensor,
        bias: torch.Tensor | None,
    ):
        out, half = packed.shape
        self.out_features = out
        self.bias = None if bias is None else bias.float()
        self.weight_bytes = _nbytes(packed, scale, low, bias)
        self._stored = (packed, scale.float(), low.float())
        self._group = 2 * half // scale.shape[1] if scale.numel() else 0
        self._kernel: tuple[torch.Tensor, torch.Tensor] | None = None
        if out and half and self._group in (32, 64, 128, 256):  # the kernel's group sizes
            q = quant.unpack_int4(packed).to(torch.int32)
            kernel_w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
            # torch's form: w = (q - 8) * scale + zero
            zero = low.float() + 8 * scale.float()
            scales_zeros = torch.stack((scale.float(), zero), dim=-1).transpose(0, 1).contiguous()
            self._kernel = (kernel_w, scales_zeros)
            self._stored = (packed, scale.float(), low.float())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        if self._kernel is not None and x32.shape[0] == 1:
            kernel_w, scales_zeros = self._kernel
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x32, kernel_w, self._group, scales_zeros)
            if self.bias is not None:
                y = y + self.bias
        else:
            y = F.linear(x32, quant.dequantize_int4(*self._stored), self.bias)
        return y.to(x.dtype)


# The matrices of each block kind, with their optional bias (model_config's contract).
BLOCK_MATRICES = {
    "attn": (("qkv", "qkv_weight", "qkv_bias"), ("o", "o_weight", "o_bias")),
    "mlp": (("gate_up", "gate_up_weight", "gate_up_bias"), ("down", "down_weight", "down_bias")),
}


def prepare_block(
    tensors: dict[str, torch.Tensor], kind: str, dtype: torch.dtype, *, resident: bool
) -> dict[str, object]:
    """A stored block made ready to compute: its matrices as `Linear`s under their
    short names (qkv, o / gate_up, down), every other tensor (norms) in `dtype`."""
    ready: dict[str, object] = {}
    used: set[str] = set()
    for short, name, bias_name in BLOCK_MATRICES[kind]:
        bias = tensors.get(bias_name)
        ready[short] = make_linear(tensors, name, bias, resident=resident, dtype=dtype)
        used.update(quant.stored_matrix_names(name, quant.stored_mode(tensors, name)))
        used.add(bias_name)
    for key, t in tensors.items():
        if key not in used:
            ready[key] = t.to(dtype)
    return ready


def block_weight_bytes(block: dict[str, object]) -> int:
    """Bytes a prepared block reads per token."""
    total = 0
    for value in block.values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        else:
            total += int(getattr(value, "weight_bytes", 0))
    return total
