"""Per-token timing of a generation, and the storage reads of the processes doing it.

`trace_completion` streams one greedy `POST /v1/completions` and stamps every token
event, sampling /proc/PID/io `read_bytes` of the given processes at each one;
`decode_figures` turns a trace (from there or from the Accelerate child) into TTFT,
the median gap between tokens, and bytes read per token and per second between the
first and the last token.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import psutil
from common import spread
from coordinator_process import CoordinatorProcess, sse_events


@dataclass(frozen=True, kw_only=True)
class TokenTrace:
    """When each generated token arrived, and each measured process's storage reads."""

    times_s: list[float]  # since the request (or generate) started
    tokens: list[int]
    read_bytes_first: dict[str, int]  # per process, at the first token
    read_bytes_last: dict[str, int]  # per process, at the last token


def decode_figures(trace: TokenTrace) -> dict[str, Any]:
    """TTFT, median gap, and reads between the first and the last token."""
    times = trace.times_s
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    figures: dict[str, Any] = {"ttft_s": times[0] if times else None, "tokens": trace.tokens}
    if not gaps:
        return figures | {"s_per_token": None, "gaps_s": []}
    decode_s = times[-1] - times[0]
    delta = {k: trace.read_bytes_last[k] - trace.read_bytes_first[k] for k in trace.read_bytes_last}
    total = sum(delta.values())
    return figures | {
        "s_per_token": statistics.median(gaps),
        "gaps_s": gaps,
        "gap_spread": spread(gaps, "s", digits=3),
        "decode_s": decode_s,
        "bytes_read_per_token": total / len(gaps),
        "read_rate_bytes_per_s": total / decode_s,
        "read_rate_per_process": {k: v / decode_s for k, v in delta.items()},
    }


def read_bytes(pids: dict[str, int]) -> dict[str, int]:
    return {name: psutil.Process(pid).io_counters().read_bytes for name, pid in pids.items()}


def trace_completion(
    server: CoordinatorProcess, prompt: list[int], max_tokens: int, pids: dict[str, int]
) -> TokenTrace:
    """One streamed greedy completion; samples the processes' reads at every token."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    start = time.perf_counter()
    resp = server.request("POST", "/v1/completions", body)
    if resp.status != 200:
        raise RuntimeError(f"POST /v1/completions: {resp.status} {resp.read()!r}")
    times: list[float] = []
    text = ""
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for event in sse_events(resp):
        delta = "".join(c.get("text", "") for c in event.get("choices", []))
        if delta:
            times.append(time.perf_counter() - start)
            last = read_bytes(pids)
            first = first or last
            text += delta
    tokens = [int(t) for t in text.split()]  # without a tokenizer a token decodes to its id
    return TokenTrace(times_s=times, tokens=tokens, read_bytes_first=first, read_bytes_last=last)
