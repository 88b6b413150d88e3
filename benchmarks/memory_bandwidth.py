"""This machine's memory bandwidth, measured with torch the way STREAM does.

    python benchmarks/memory_bandwidth.py [--quick] [--json]

Two kernels over float32 buffers far larger than any cache, on all cores (torch's
intra-op threads; elementwise ops of this size are split across them):

copy   a = b            2 x 4 bytes moved per element
triad  a = b + s * c    3 x 4 bytes moved per element (`torch.add(b, c, alpha=s, out=a)`)

Bytes are counted as STREAM counts them (reads plus writes, no write-allocate
traffic). Each kernel runs `repeats` times (30; each takes milliseconds) after one
warm-up; the best time is the figure (the bandwidth the memory can give, what a
decode step could reach; on a shared machine the best repeat is the one least
disturbed by other processes), the median is reported beside it.
`memory_bandwidth_gb_per_s` is the larger of the two best figures: the limit a
decode rate is compared with.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from common import machine_info, print_json_last

FULL_ELEMENTS = 1 << 25  # 128 MiB per float32 buffer
QUICK_ELEMENTS = 1 << 24  # 64 MiB


def _timed(kernel: Callable[[], Any], repeats: int) -> list[float]:
    kernel()  # warm-up: pages touched, threads started
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        kernel()
        times.append(time.perf_counter() - start)
    return times


def measure_memory_bandwidth(
    num_elements: int = FULL_ELEMENTS, repeats: int = 30, threads: int | None = None
) -> dict[str, Any]:
    """Copy and triad GB/s (best and median of `repeats`) on `threads` (default: all cores)."""
    if num_elements < 1 << 20 or repeats < 1:
        raise ValueError(
            f"need at least 2^20 elements (beyond the caches) and 1 repeat, "
            f"got {num_elements} and {repeats}"
        )
    before = torch.get_num_threads()
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    try:
        a, b, c = (torch.rand(num_elements) for _ in range(3))
        copy_s = _timed(lambda: a.copy_(b), repeats)
        triad_s = _timed(lambda: torch.add(b, c, alpha=3.0, out=a), repeats)
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    copy_bytes, triad_bytes = 2 * 4 * num_elements, 3 * 4 * num_elements
    result = {
        "copy_gb_per_s": copy_bytes / min(copy_s) / 1e9,
        "copy_gb_per_s_median": copy_bytes / statistics.median(copy_s) / 1e9,
        "triad_gb_per_s": triad_bytes / min(triad_s) / 1e9,
        "triad_gb_per_s_median": triad_bytes / statistics.median(triad_s) / 1e9,
        "buffer_bytes": 4 * num_elements,
        "repeats": repeats,
        "threads": used_threads,
    }
    result["memory_bandwidth_gb_per_s"] = max(result["copy_gb_per_s"], result["triad_gb_per_s"])
    return result


def report(result: dict[str, Any]) -> str:
    return (
        f"memory bandwidth ({result['threads']} threads, {result['buffer_bytes'] / 2**20:.0f} "
        f"MiB buffers, best / median of {result['repeats']}): "
        f"copy {result['copy_gb_per_s']:.1f} / {result['copy_gb_per_s_median']:.1f} GB/s, "
        f"triad {result['triad_gb_per_s']:.1f} / {result['triad_gb_per_s_median']:.1f} GB/s"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 MiB buffers")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    result = measure_memory_bandwidth(QUICK_ELEMENTS if args.quick else FULL_ELEMENTS)
    result["machine"] = machine_info()
    if not args.json:
        print(report(result))
    print_json_last(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
