"""edgecluster's decode timed over HTTP, as `inference.py` measures it.

`measure_edge` starts `edge-coordinator serve --local N` (`coordinator_process.py`),
times streamed greedy completions (TTFT: request start to the first token event;
decode rate: (tokens - 1) / (first token event -> finish event); a completion refused
while the cluster re-plans is retried and the refusal recorded), and reads, just
before the cluster stops, each agent's weight bytes, peak RSS and threads, and the
bytes the whole cluster reads per decode step (see `cluster_bytes_per_token`).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

from common import peak_rss_bytes
from coordinator_process import (
    CoordinatorProcess,
    ServeOptions,
    StreamError,
    cmdline_flag,
    serve_coordinator,
    sse_events,
)
from decode_timing import Run, timed_runs

READY_TIMEOUT_S = 300.0
MAX_RETRIES = 3  # completions refused while the cluster re-plans (an agent seen dead)
WEIGHTS_BY_DTYPE = {"float32": "fp32", "bfloat16": "bf16"}  # a serve without --weights


def stream_completion(server: CoordinatorProcess, prompt: list[int], new_tokens: int) -> Run:
    """One streamed, greedy completion; times the first token and the finish event."""
    body = {
        "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    start = time.perf_counter()
    with closing(server.request("POST", "/v1/completions", body)) as resp:
        if resp.status != 200:
            raise RuntimeError(f"POST /v1/completions: {resp.status} {resp.read()!r}")
        first = end = 0.0
        num_tokens = 0
        for event in sse_events(resp):
            if event.get("usage"):
                num_tokens = int(event["usage"]["completion_tokens"])
            for choice in event.get("choices", []):
                now = time.perf_counter()
                first = first or now
                end = now if choice.get("finish_reason") else end
    if num_tokens < 2 or not end:
        raise RuntimeError(f"the stream gave {num_tokens} tokens and no finish; cannot time it")
    return Run(ttft_s=first - start, decode_s=end - first, num_tokens=num_tokens)


def completion_with_retries(
    server: CoordinatorProcess,
    prompt: list[int],
    new_tokens: int,
    retries: list[str],
    say: Callable[[str], None],
) -> Run:
    """A completion; one the coordinator refuses while it re-plans (on a loaded machine
    an agent can miss its heartbeats) is retried once it is ready again, and recorded."""
    while True:
        try:
            return stream_completion(server, prompt, new_tokens)
        except StreamError as exc:
            if exc.code != "backend_unavailable" or len(retries) >= MAX_RETRIES:
                raise
            retries.append(str(exc))
            say(f"  retrying: {exc}")
            time.sleep(1.0)
            server.wait_ready(READY_TIMEOUT_S)


def agents_by_name(view: dict[str, Any]) -> list[dict[str, Any]]:
    """The agents of a `GET /v1/cluster` view, ordered by name (as `agent_processes` is)."""
    return sorted(view["agents"], key=lambda a: a["name"])


def shard_field(view: dict[str, Any], key: str) -> list[Any]:
    """`key` of each agent's shard (0 for an agent without one), ordered by agent name."""
    return [(a.get("shard") or {}).get(key) or 0 for a in agents_by_name(view)]


def cluster_bytes_per_token(view: dict[str, Any]) -> tuple[int, int, list[str]]:
    """(agents' bytes, hub's bytes) read per decode step, and notes on how they were known."""
    agents, notes = 0, []
    for a in agents_by_name(view):
        shard = a.get("shard") or {}
        resident = shard.get("resident_weight_bytes")
        if shard.get("streaming") or not resident:
            agents += int(shard.get("weight_bytes") or 0)
            if shard:
                notes.append(f"agent {a['name']} streams: its bytes are its shard as stored")
        else:
            agents += int(resident)
    hub = view["hub"]
    if "bytes_per_token" in hub:
        return agents, int(hub["bytes_per_token"]), notes
    notes.append("the view has no hub bytes_per_token: hub weight_bytes counted (with embedding)")
    return agents, int(hub["weight_bytes"]), notes


def measure_edge(
    opts: ServeOptions,
    prompt: list[int],
    *,
    new_tokens: int,
    num_runs: int,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Starts the cluster, times `num_runs` completions after a warm-up, reads its view."""
    num_agents, mode = opts.num_agents, opts.weights or WEIGHTS_BY_DTYPE[opts.dtype]
    with (
        tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp,
        serve_coordinator(opts, Path(tmp)) as server,
    ):
        started = time.perf_counter()
        server.wait_ready(READY_TIMEOUT_S)
        say(f"edgecluster, {num_agents} agents, {mode}: ready in "
            f"{time.perf_counter() - started:.1f} s; timing")  # fmt: skip
        retries: list[str] = []
        runs = timed_runs(
            lambda: completion_with_retries(server, prompt, new_tokens, retries, say),
            num_runs,
            say,
        )
        _, view = server.get_json("/v1/cluster")
        agents = server.agent_processes()
        threads = [int(cmdline_flag(a.cmdline(), "--threads") or 0) for a in agents]
        served = view["hub"].get("weights", mode)
        if opts.weights and served != mode:
            raise RuntimeError(f"asked for {mode} weights, the cluster serves {served}")
        agent_bytes, hub_bytes, notes = cluster_bytes_per_token(view)
        return {
            "agents": num_agents,
            "weights": mode,
            "dtype": opts.dtype,
            "runs": runs,
            "agent_peak_rss_bytes": [peak_rss_bytes(a.pid) for a in agents],
            "coordinator_peak_rss_bytes": peak_rss_bytes(server.proc.pid),
            "agent_weight_bytes": shard_field(view, "weight_bytes"),
            "agent_resident_weight_bytes": shard_field(view, "resident_weight_bytes"),
            "agent_threads": threads,
            "agent_matmul_gflops": [a["matmul_gflops"] for a in agents_by_name(view)],
            "hub_weight_bytes": view["hub"]["weight_bytes"],
            "agent_bytes_per_token": agent_bytes,
            "hub_bytes_per_token": hub_bytes,
            "notes": notes,
            "retries": retries,
        }
