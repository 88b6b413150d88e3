"""Shared pieces of the benchmarks: what the machine was, medians and spread, output.

Every benchmark prints a human-readable table first and one JSON object as its last
line (see ../shared/BENCHMARKS.md). Scripts in this folder run as
`python benchmarks/NAME.py`, which puts this folder on sys.path, so they import this
module as `common`.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Cores, memory, CPU model, Python and torch versions, load at the start."""
    import psutil
    import torch

    return {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_total_bytes": psutil.virtual_memory().total,
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_avg_1m": os.getloadavg()[0],
    }


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (0..100) of already sorted values."""
    if not sorted_values:
        raise ValueError("no samples")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def spread(samples: Sequence[float], unit: str = "us", digits: int = 1) -> dict[str, float]:
    """Median, p10, p90 and IQR of `samples`, keys suffixed with `unit`, rounded."""
    values = sorted(samples)
    stats = {
        f"median_{unit}": statistics.median(values),
        f"p10_{unit}": percentile(values, 10),
        f"p90_{unit}": percentile(values, 90),
        f"iqr_{unit}": percentile(values, 75) - percentile(values, 25),
    }
    return {key: round(value, digits) for key, value in stats.items()}


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A plain aligned text table of `columns` from `rows` (floats to one decimal)."""

    def cell(value: Any) -> str:
        return f"{value:.1f}" if isinstance(value, float) else str(value)

    cells = [[cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def print_json_last(result: Mapping[str, Any]) -> None:
    """The benchmark's result as one JSON object on one line (the output's last line)."""
    sys.stdout.flush()
    print(json.dumps(result, separators=(",", ":")), flush=True)


def peak_rss_bytes(pid: int) -> int:
    """Peak resident set size (VmHWM) of a live process, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # the kernel reports kB
    raise ValueError(f"/proc/{pid}/status has no VmHWM line")


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the kernel's pick for a bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
