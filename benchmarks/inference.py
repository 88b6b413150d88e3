"""Decode speed and time to first token: edgecluster against transformers' generate and
against this machine's memory bandwidth, for each agent count and weight mode.

    python benchmarks/inference.py [--quick] [--json] [--model M] [--agents 1,2,3]
                                   [--weights fp32,bf16,int8,int4] [--hf-threads 1,2]
                                   [--cache-dir DIR]

In one run on this machine, with the same checkpoint, greedy decoding, a prompt of
exactly 128 token ids and 64 new tokens:

0. Memory bandwidth, before the first cluster starts and again after the last
   transformers run: a copy and a STREAM-like triad with torch on all cores, best of
   30 (`memory_bandwidth.py`); the largest figure is `memory_bandwidth_gb_per_s`.
1. edgecluster, once per combination of `--weights` (outer) and `--agents` (inner):
   `edge-coordinator serve --model M --local N --weights MODE` as a child process (its
   own process group, cache in $EDGE_CACHE_DIR or the user's cache, so the GGUF
   conversion and the agents' shards are reused between runs). bf16 computes in
   bfloat16, the other modes in float32. `--weights` is passed whenever this checkout's
   `serve` has the flag (so the server's own default never decides the mode); without
   it fp32 and bf16 are served by `--dtype` alone and int8/int4 are refused. Each
   repetition is one streamed `POST /v1/completions`: TTFT is request start to the
   first token event, decode rate is (tokens - 1) / (first token event -> finish event).
   Then, from `GET /v1/cluster` and /proc just before the cluster stops: each agent's
   weight bytes, peak RSS (VmHWM) and threads, and the hub's bytes per token.
2. transformers, after every cluster has stopped (the machine has few cores), in this
   process (`hf_decode.py`), once per compute dtype (float32 is the peer of fp32, int8
   and int4; bfloat16 of bf16), not per agent count: at each `--hf-threads` count
   (default 1 and all cores), and the fastest, per figure, is the peer.

Per run, `bytes_per_token` is the weight bytes the whole cluster reads per decode step:
each agent's blocks as prepared in memory (`resident_weight_bytes`; an agent that
streams from disk: its shard as stored, `weight_bytes`) plus the hub's LM head
(`hub.bytes_per_token`; a view without it gives the hub's `weight_bytes`, which
over-counts the embedding, and a note says so). KV-cache reads (about 1% here) are not
counted. `gb_per_s` = bytes_per_token * tokens_per_s / 1e9; `bandwidth_fraction` =
gb_per_s / memory_bandwidth_gb_per_s.

One warm-up, then 3 (`--quick`) or 7 repetitions; medians and spread (min-max) are
reported. The API has no ignore-EOS switch, so the edge token count is the one the
model produced (reported); the prompt (a repeated English paragraph) makes it run to 64.

Bars (issue 15): 3 agents fp32 decode >= 2.0x transformers; 1 agent fp32 >= 60% of the
memory bandwidth; int8 >= 1.6x fp32 at 3 agents; every run's TTFT <= transformers';
every 1-agent run at least as fast as transformers. Issue 3's, on the 3-agent fp32 run:
ratio >= 0.8, each agent's weight bytes <= 40% of the layer weights. A bar whose runs
were not made is null ("not run").

Output: a table of all runs first; the last line is one JSON object. Its top-level keys
are today's, for the default run (the first combination); `"runs"` lists every
combination and `"memory_bandwidth_gb_per_s"` is the limit. The number of timed
repetitions, called "runs" before issue 15, is now `"repetitions"`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import machine_info, print_json_last
from coordinator_process import ServeOptions, serve_supports_weights
from decode_timing import summarize
from edge_decode import measure_edge
from hf_decode import measure_hf
from inference_report import bars, report
from memory_bandwidth import FULL_ELEMENTS, QUICK_ELEMENTS, measure_memory_bandwidth

from edgecluster.weights.checkpoint import Checkpoint
from edgecluster.weights.models import DEFAULT_MODEL, default_cache_dir, resolve_model
from edgecluster.weights.quant import QUANTIZED_MODES, WEIGHT_MODES, check_mode, matrix_shapes

PROMPT_TOKENS = 128
NEW_TOKENS = 64
TOKEN = "bench-inference-token"
PARAGRAPH = (
    "The old lighthouse stood at the edge of the cliff, its white paint peeling in the salt "
    "wind. Every evening the keeper climbed the narrow stairs, trimmed the wick, and watched "
    "the beam sweep across the dark water. Ships passed far out at sea, and the keeper wrote "
    "their names in a worn leather book, one line for each vessel, with the date and the "
    "weather. "
)


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    model: str
    agents: tuple[int, ...]  # agent counts, in run order
    weights: tuple[str, ...]  # weight modes, in run order
    num_runs: int  # timed repetitions per combination
    cache_dir: Path
    hf_threads: tuple[int, ...]  # torch thread counts tried for transformers; fastest counts
    quick: bool = False

    def __post_init__(self) -> None:
        if not self.agents or min(self.agents) < 1:
            raise ValueError(f"--agents needs counts >= 1 (e.g. 1,2,3), got {self.agents}")
        if not self.weights:
            raise ValueError(f"--weights needs modes from {', '.join(WEIGHT_MODES)}")
        for mode in self.weights:
            check_mode(mode)
        if self.num_runs < 1:
            raise ValueError(f"the number of runs must be at least 1, got {self.num_runs}")
        if not self.hf_threads or min(self.hf_threads) < 1:
            raise ValueError(f"--hf-threads needs counts >= 1, got {self.hf_threads}")


def compute_dtype(mode: str) -> str:
    """The dtype a mode computes in (what `serve --weights` does)."""
    return "bfloat16" if mode == "bf16" else "float32"


def serve_options(cfg: BenchConfig, num_agents: int, mode: str) -> ServeOptions:
    flag = serve_supports_weights()
    if not flag and mode in QUANTIZED_MODES:
        raise ValueError(
            f"--weights {mode}: this checkout's `edge-coordinator serve` has no --weights "
            "flag; run fp32 or bf16, or update edgecluster"
        )
    return ServeOptions(
        model=cfg.model, num_agents=num_agents, dtype=compute_dtype(mode), token=TOKEN,
        cache_dir=cfg.cache_dir, weights=mode if flag else None,
    )  # fmt: skip


def prompt_ids(model_dir: Path) -> list[int]:
    """Exactly PROMPT_TOKENS ids: the paragraph tokenized, repeated, truncated."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(model_dir)).encode(PARAGRAPH, add_special_tokens=False)
    return (ids * (PROMPT_TOKENS // len(ids) + 1))[:PROMPT_TOKENS]


def layer_weight_bytes(model_dir: Path, mode: str) -> int:
    """Bytes of every `model.layers.*` tensor of the checkpoint stored in `mode`:
    matrices in its stored form, norms and biases in its compute dtype."""
    itemsize = getattr(torch, compute_dtype(mode)).itemsize
    total = 0
    with Checkpoint(model_dir) as ckpt:
        for name in (n for n in ckpt.names() if n.startswith("model.layers.")):
            shape = ckpt.shape(name)
            if len(shape) != 2:
                total += torch.Size(shape).numel() * itemsize
                continue
            for dims, dtype in matrix_shapes(name, shape[0], shape[1], mode).values():
                total += torch.Size(dims).numel() * dtype.itemsize
    return total


# ------------------------------------------------------------------ transformers


def hf_peer(
    cfg: BenchConfig, model_dir: Path, dtype: str, prompt: list[int], say: Callable[[str], None]
) -> dict[str, Any]:
    """transformers in `dtype` at its best: per figure, the fastest thread count."""
    timed = measure_hf(
        model_dir, getattr(torch, dtype), prompt, new_tokens=NEW_TOKENS,
        threads=cfg.hf_threads, num_runs=cfg.num_runs, say=say,
    )  # fmt: skip
    by_threads = {t: summarize(r) for t, r in timed.items()}
    decode = max(by_threads, key=lambda t: by_threads[t]["tokens_per_s"])
    ttft = min(by_threads, key=lambda t: by_threads[t]["ttft_s"])
    return {
        "by_threads": by_threads,
        "threads": decode,
        "ttft_threads": ttft,
        "tokens_per_s": by_threads[decode]["tokens_per_s"],
        "ttft_s": by_threads[ttft]["ttft_s"],
    }


# ------------------------------------------------------------------ driver


def run_entry(
    edge: dict[str, Any], hf: dict[str, Any], bandwidth_gb_s: float, model_dir: Path
) -> dict[str, Any]:
    """One combination's figures: the issue's keys first, the spread after."""
    e = summarize(edge["runs"])
    layer_bytes = layer_weight_bytes(model_dir, edge["weights"])
    bytes_per_token = edge["agent_bytes_per_token"] + edge["hub_bytes_per_token"]
    gb_per_s = bytes_per_token * e["tokens_per_s"] / 1e9
    return {
        "agents": edge["agents"],
        "weights": edge["weights"],
        "tokens_per_s": e["tokens_per_s"],
        "hf_tokens_per_s": hf["tokens_per_s"],
        "ratio": e["tokens_per_s"] / hf["tokens_per_s"],
        "ttft_s": e["ttft_s"],
        "hf_ttft_s": hf["ttft_s"],
        "bytes_per_token": bytes_per_token,
        "gb_per_s": gb_per_s,
        "bandwidth_fraction": gb_per_s / bandwidth_gb_s,
        "tokens_per_s_min": e["tokens_per_s_min"],
        "tokens_per_s_max": e["tokens_per_s_max"],
        "ttft_s_min": e["ttft_s_min"],
        "ttft_s_max": e["ttft_s_max"],
        "num_tokens": e["num_tokens"],
        "agent_bytes_per_token": edge["agent_bytes_per_token"],
        "hub_bytes_per_token": edge["hub_bytes_per_token"],
        "max_agent_weight_fraction": max(edge["agent_weight_bytes"]) / layer_bytes,
        "dtype": edge["dtype"],
        "retries": edge["retries"],
    }


def default_run_keys(
    cfg: BenchConfig, edge: dict[str, Any], hf: dict[str, Any], model_dir: Path
) -> dict[str, Any]:
    """Today's top-level keys, for the default run (the first combination)."""
    e = summarize(edge["runs"])
    layer_bytes = layer_weight_bytes(model_dir, edge["weights"])
    return {
        "model": cfg.model,
        "agents": edge["agents"],
        "weights": edge["weights"],
        "edge_tokens_per_s": e["tokens_per_s"],
        "hf_tokens_per_s": hf["tokens_per_s"],
        "ratio": e["tokens_per_s"] / hf["tokens_per_s"],
        "edge_ttft_s": e["ttft_s"],
        "hf_ttft_s": hf["ttft_s"],
        "agent_peak_rss_bytes": edge["agent_peak_rss_bytes"],
        "agent_weight_bytes": edge["agent_weight_bytes"],
        "layer_weight_bytes": layer_bytes,
        "max_agent_weight_fraction": max(edge["agent_weight_bytes"]) / layer_bytes,
        "dtype": edge["dtype"],
        "edge": e,
        "hf": hf["by_threads"][hf["threads"]],
        "hf_threads": hf["threads"],
        "hf_ttft_threads": hf["ttft_threads"],
        "hf_by_threads": {str(t): v for t, v in hf["by_threads"].items()},
        "edge_agent_threads": edge["agent_threads"],
        "edge_agent_matmul_gflops": edge["agent_matmul_gflops"],
        "agent_resident_weight_bytes": edge["agent_resident_weight_bytes"],
        "coordinator_peak_rss_bytes": edge["coordinator_peak_rss_bytes"],
        "hub_weight_bytes": edge["hub_weight_bytes"],
    }


def run_benchmark(cfg: BenchConfig, say: Callable[[str], None]) -> dict[str, Any]:
    machine = machine_info()
    model_dir = resolve_model(cfg.model, cfg.cache_dir)
    prompt = prompt_ids(model_dir)
    for mode in cfg.weights:
        serve_options(cfg, cfg.agents[0], mode)  # refuse a mode this serve lacks, up front
    say("memory bandwidth (copy, triad)")
    bandwidth = [measure_memory_bandwidth(QUICK_ELEMENTS if cfg.quick else FULL_ELEMENTS)]
    timing: dict[str, Any] = {"new_tokens": NEW_TOKENS, "num_runs": cfg.num_runs, "say": say}
    edges = [
        measure_edge(serve_options(cfg, n, mode), prompt, **timing)
        for mode in cfg.weights
        for n in cfg.agents
    ]
    machine["load_avg_1m_after_edge"] = os.getloadavg()[0]  # the phases may see other loads
    dtypes = dict.fromkeys(compute_dtype(mode) for mode in cfg.weights)
    hf = {dtype: hf_peer(cfg, model_dir, dtype, prompt, say) for dtype in dtypes}
    machine["load_avg_1m_end"] = os.getloadavg()[0]
    bandwidth.append(measure_memory_bandwidth(QUICK_ELEMENTS if cfg.quick else FULL_ELEMENTS))
    best = max(bandwidth, key=lambda b: b["memory_bandwidth_gb_per_s"])
    limit = best["memory_bandwidth_gb_per_s"]
    best["first_last_gb_per_s"] = [b["memory_bandwidth_gb_per_s"] for b in bandwidth]
    runs = [run_entry(e, hf[e["dtype"]], limit, model_dir) for e in edges]
    result = default_run_keys(cfg, edges[0], hf[edges[0]["dtype"]], model_dir)
    result["bar"] = bars(runs)
    notes = dict.fromkeys(n for e in edges for n in e["notes"])
    for r in runs:
        if r["retries"]:
            notes[f"{r['agents']} agents {r['weights']}: retried {len(r['retries'])} refused "
                  "completions (the cluster re-planned mid-run)"] = None  # fmt: skip
    result.update(
        prompt_tokens=len(prompt), repetitions=cfg.num_runs, runs=runs,
        memory_bandwidth_gb_per_s=limit, memory_bandwidth=best, notes=list(notes),
        machine=machine,
    )  # fmt: skip
    return result


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected counts like 1,2,3") from None


def mode_list(text: str) -> tuple[str, ...]:
    modes = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    bad = [m for m in modes if m not in WEIGHT_MODES]
    if bad:
        raise argparse.ArgumentTypeError(f"{bad}: choose from {', '.join(WEIGHT_MODES)}")
    return modes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 timed runs instead of 7")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="name, checkpoint dir or .gguf")
    parser.add_argument(
        "--agents", type=int_list, default=(3,), help="local agent counts, e.g. 1,2,3 (default 3)"
    )
    parser.add_argument(
        "--weights", type=mode_list, default=("fp32",),
        help=f"weight modes, comma list of {','.join(WEIGHT_MODES)} (default fp32)",
    )  # fmt: skip
    parser.add_argument("--cache-dir", type=Path, help="default: $EDGE_CACHE_DIR or ~/.cache")
    parser.add_argument(
        "--hf-threads",
        type=int_list,
        default=tuple(sorted({1, os.cpu_count() or 1})),
        help="torch thread counts to time transformers at; the fastest is the peer",
    )
    args = parser.parse_args(argv)
    cfg = BenchConfig(
        model=args.model,
        agents=tuple(dict.fromkeys(args.agents)),
        weights=args.weights,
        num_runs=3 if args.quick else 7,
        cache_dir=args.cache_dir or default_cache_dir(),
        hf_threads=tuple(sorted(set(args.hf_threads))),
        quick=args.quick,
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop the cluster
    say = (lambda _: None) if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    result = run_benchmark(cfg, say)
    result["mode"] = "quick" if args.quick else "full"
    if not args.json:
        print(report(result, NEW_TOKENS))
    print_json_last(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
