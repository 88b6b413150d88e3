"""Which kernel reads a decode step's weights fastest: the evidence behind engine/linear.py.

    python benchmarks/kernels.py [--quick] [--json] [--compile]

The layer matrices of SmolLM2-135M (30 layers of qkv [960, 576], o [576, 576],
gate_up [3072, 576], down [576, 1536]; 425 MB in fp32, more than the last-level
cache, so every pass reads memory), random values, multiplied by one row (decode)
and by 128 rows (a prompt), with 1 torch thread and with all cores, by each way
edgecluster could compute them:

- `F.linear` on [out, in] fp32 (what transformers does), `x @ w` on a transposed
  [in, out] copy (edgecluster's resident fp32), the bmm split of one row over
  threads (engine.linear.DenseLinear), bf16 F.linear;
- int8: torch's weight-only `_weight_int8pack_mm` (edgecluster's int8), the int8
  matrix widened to fp32 per product, and fbgemm's `quantized::linear_dynamic`
  (fast, but it rounds activations: not used); int4: `_weight_int4pack_mm_for_cpu`;
- with `--compile`, `torch.compile` (inductor) of the fp32 and int8-dequantizing
  products, compile time excluded (it takes tens of seconds per shape here).

A pass is all 120 matrices; the median of the timed passes is reported as ms per
pass and as GB/s of the bytes the format stores. The memory bandwidth of the box
(torch triad, all cores) is measured in the same run. Table first, last line JSON.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from common import format_table, machine_info, print_json_last

from edgecluster.engine.linear import DenseLinear, Int4Linear, Int8Linear
from edgecluster.weights import quant

SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))
LAYERS = 30


def triad_gb_per_s(reps: int) -> float:
    """a = b + s * c over 3 x 256 MiB, best of `reps`: bytes moved / time."""
    n = 64 << 20
    b, c, a = torch.ones(n), torch.ones(n), torch.empty(n)
    best = min(_timed(lambda: torch.add(b, c, alpha=3.0, out=a)) for _ in range(reps))
    return 3 * n * 4 / best / 1e9


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def matrices() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen) * 0.05 for _ in range(LAYERS) for s in SHAPES]


def variants(ws: list[torch.Tensor], compile_too: bool) -> dict[str, tuple[list[Any], int]]:
    """name -> (callables x -> y, one per matrix; bytes stored per pass)."""

    def nbytes(ts: list[torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in ts)

    fp32_bytes = nbytes(ws)
    out: dict[str, tuple[list[Any], int]] = {
        "fp32 F.linear": ([lambda x, w=w: F.linear(x, w) for w in ws], fp32_bytes),
        "fp32 x @ w.T (resident)": (
            [DenseLinear(w, None, transpose=True) for w in ws],
            fp32_bytes,
        ),
    }
    bf16 = [w.bfloat16() for w in ws]
    out["bf16 F.linear"] = (
        [lambda x, w=w: F.linear(x.bfloat16(), w) for w in bf16],
        fp32_bytes // 2,
    )
    stored8 = [quant.quantize_matrix("w", w, "int8") for w in ws]
    bytes8 = sum(nbytes(list(s.values())) for s in stored8)
    out["int8 fbgemm dynamic (rounds activations)"] = (
        [_fbgemm_int8(s["w.int8"], s["w.scale"]) for s in stored8],
        bytes8,
    )
    out["int8 weight-only (edgecluster)"] = (
        [Int8Linear(s["w.int8"], s["w.scale"], None, resident=True) for s in stored8],
        bytes8,
    )
    out["int8 widened per product"] = (
        [
            lambda x, s=s: F.linear(x, s["w.int8"].to(torch.float32)).mul_(s["w.scale"])
            for s in stored8
        ],
        bytes8,
    )
    stored4 = [quant.quantize_matrix("w", w, "int4") for w in ws]
    out["int4 torch kernel"] = (
        [Int4Linear(s["w.int4"], s["w.scale"], s["w.min"], None) for s in stored4],
        sum(nbytes(list(s.values())) for s in stored4),
    )
    if compile_too:
        lin = torch.compile(lambda x, w: x @ w, dynamic=False)
        deq = torch.compile(lambda x, q, s: F.linear(x, q.to(x.dtype)) * s, dynamic=False)
        wts = [w.t().contiguous() for w in ws]
        out["fp32 compiled x @ w"] = ([lambda x, w=w: lin(x, w) for w in wts], fp32_bytes)
        out["int8 compiled dequant"] = (
            [lambda x, s=s: deq(x, s["w.int8"], s["w.scale"]) for s in stored8],
            bytes8,
        )
    return out


def _fbgemm_int8(q: torch.Tensor, scale: torch.Tensor) -> Any:
    """fbgemm's packed int8 with dynamic activation quantization (not used: see
    engine.linear.Int8Linear)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated in 2.13
        zero = torch.zeros(q.shape[0], dtype=torch.long)
        qw = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
        packed = torch.ops.quantized.linear_prepack(qw, None)
    return lambda x: torch.ops.quantized.linear_dynamic(x, packed, True)


def time_pass(ops: list[Any], x: torch.Tensor, passes: int) -> float:
    """Median seconds of one pass over every matrix (after one warm-up pass)."""
    cols = {op_in: x[:, :op_in].contiguous() for op_in in (576, 1536)}
    inputs = [cols[w_in] for _ in range(LAYERS) for _, w_in in SHAPES]
    with torch.inference_mode():
        for op, xi in zip(ops, inputs, strict=True):
            op(xi)
        times = [
            _timed(lambda: [op(xi) for op, xi in zip(ops, inputs, strict=True)])
            for _ in range(passes)
        ]
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer passes, no 128-row case")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    args = parser.parse_args()
    say = (lambda *_: None) if args.json else print
    cores = torch.get_num_threads()
    passes = 3 if args.quick else 7
    bandwidth = triad_gb_per_s(3 if args.quick else 7)
    say(f"memory bandwidth (triad, {cores} threads): {bandwidth:.1f} GB/s")
    ws = matrices()
    rows: list[dict[str, Any]] = []
    for name, (ops, nbytes) in variants(ws, args.compile).items():
        for threads in sorted({1, cores}):
            torch.set_num_threads(threads)
            for tokens in (1,) if args.quick else (1, 128):
                if tokens > 1 and ("int4" in name or "weight-only" in name):
                    continue  # torch's kernels take tens of seconds on 128 rows here
                x = torch.randn(tokens, 1536)
                seconds = time_pass(ops, x, passes)
                row = {
                    "kernel": name, "threads": threads, "rows": tokens,
                    "ms": round(seconds * 1e3, 2), "gb_per_s": round(nbytes / seconds / 1e9, 2),
                    "mb": round(nbytes / 1e6, 1),
                }  # fmt: skip
                rows.append(row)
                say(f"  {name:26s} threads {threads} rows {tokens:3d}: {row['ms']:8.2f} ms")
        torch.set_num_threads(cores)
    say("")
    say(format_table(rows, ["kernel", "threads", "rows", "ms", "gb_per_s", "mb"]))
    print_json_last(
        {"memory_bandwidth_gb_per_s": bandwidth, "kernels": rows, "machine": machine_info()}
    )


if __name__ == "__main__":
    main()
