"""Decode speed and time to first token: edgecluster against transformers' generate.

    python benchmarks/inference.py [--quick] [--json] [--model M] [--agents N]
                                   [--dtype float32|bfloat16] [--cache-dir DIR]

In one run on this machine, with the same checkpoint, dtype, greedy decoding, a
prompt of exactly 128 token ids and 64 new tokens:

1. edgecluster: `edge-coordinator serve --model M --local N` runs as a child process
   (its own process group, cache in $EDGE_CACHE_DIR or the user's cache, so the GGUF
   conversion and the agents' shards are reused between runs). Each repetition is one
   streamed `POST /v1/completions`: TTFT is request start to the first token event,
   decode rate is (tokens - 1) / (first token event -> finish event). Then per agent:
   the weight bytes it holds (`GET /v1/cluster`: its shard's block files, as the agent
   reports them) and its peak RSS (VmHWM) from /proc, just before the cluster stops.
2. transformers: after the cluster is stopped (the machine has few cores), `generate`
   in this process: TTFT is `max_new_tokens=1`; decode rate is 63 / (time for 64
   tokens with `min_new_tokens=64` - TTFT). It is timed at each `--hf-threads` count
   (default 1 and all cores) and the fastest, per figure, is the peer: on a loaded
   machine torch's default of one thread per core can be several times slower than
   one thread, and a ratio against a crippled peer would flatter us.

One warm-up, then 3 (`--quick`) or 7 repetitions; medians and spread are reported.
The API has no ignore-EOS switch, so the edge token count is the one the model
produced (reported); the prompt (a repeated English paragraph) makes it run to 64.

Bar (issue 3): smollm2-135m, fp32, 3 agents: edge / HF decode ratio >= 0.8, and each
agent's weight bytes <= 40% of the model's layer weights. The table comes first;
the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import format_table, machine_info, peak_rss_bytes, print_json_last
from coordinator_process import (
    CoordinatorProcess,
    ServeOptions,
    cmdline_flag,
    serve_coordinator,
    sse_events,
)

from edgecluster.weights.checkpoint import Checkpoint
from edgecluster.weights.models import DEFAULT_MODEL, default_cache_dir, resolve_model

PROMPT_TOKENS = 128
NEW_TOKENS = 64
TOKEN = "bench-inference-token"
READY_TIMEOUT_S = 300.0
BAR_RATIO, BAR_WEIGHT_FRACTION = 0.8, 0.4
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
    num_agents: int
    dtype: str
    num_runs: int
    cache_dir: Path
    hf_threads: tuple[int, ...]  # torch thread counts tried for transformers; fastest counts

    def __post_init__(self) -> None:
        if self.num_agents < 1:
            raise ValueError(f"--agents must be at least 1, got {self.num_agents}")
        if self.num_runs < 1:
            raise ValueError(f"the number of runs must be at least 1, got {self.num_runs}")
        if not self.hf_threads or min(self.hf_threads) < 1:
            raise ValueError(f"--hf-threads needs counts >= 1, got {self.hf_threads}")


@dataclass(frozen=True, kw_only=True)
class Run:
    """One timed generation: time to first token, then the rest."""

    ttft_s: float
    decode_s: float  # from the first token to the last
    num_tokens: int

    @property
    def tokens_per_s(self) -> float:
        return (self.num_tokens - 1) / self.decode_s


def prompt_ids(model_dir: Path) -> list[int]:
    """Exactly PROMPT_TOKENS ids: the paragraph tokenized, repeated, truncated."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(model_dir)).encode(PARAGRAPH, add_special_tokens=False)
    return (ids * (PROMPT_TOKENS // len(ids) + 1))[:PROMPT_TOKENS]


def layer_weight_bytes(model_dir: Path, dtype: torch.dtype) -> int:
    """Bytes of every `model.layers.*` tensor of the checkpoint, stored in `dtype`."""
    with Checkpoint(model_dir) as ckpt:
        names = [n for n in ckpt.names() if n.startswith("model.layers.")]
        numel = sum(torch.Size(ckpt.shape(n)).numel() for n in names)
    return numel * dtype.itemsize


# ------------------------------------------------------------------ edgecluster


def stream_completion(server: CoordinatorProcess, prompt: list[int]) -> Run:
    """One streamed, greedy completion; times the first token and the finish event."""
    body = {
        "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True,
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


def agents_by_name(view: dict[str, Any]) -> list[dict[str, Any]]:
    """The agents of a `GET /v1/cluster` view, ordered by name (as `agent_processes` is)."""
    return sorted(view["agents"], key=lambda a: a["name"])


def shard_field(view: dict[str, Any], key: str) -> list[Any]:
    """`key` of each agent's shard (0 for an agent without one), ordered by agent name."""
    return [(a.get("shard") or {}).get(key) or 0 for a in agents_by_name(view)]


def measure_edge(cfg: BenchConfig, prompt: list[int], say: Callable[[str], None]) -> dict[str, Any]:
    opts = ServeOptions(
        model=cfg.model, num_agents=cfg.num_agents, dtype=cfg.dtype, token=TOKEN,
        cache_dir=cfg.cache_dir,
    )  # fmt: skip
    with (
        tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp,
        serve_coordinator(opts, Path(tmp)) as server,
    ):
        started = time.perf_counter()
        server.wait_ready(READY_TIMEOUT_S)
        say(f"edgecluster ready in {time.perf_counter() - started:.1f} s; timing")
        runs = timed_runs(lambda: stream_completion(server, prompt), cfg.num_runs, say)
        _, view = server.get_json("/v1/cluster")
        agents = server.agent_processes()
        threads = [int(cmdline_flag(a.cmdline(), "--threads") or 0) for a in agents]
        return {
            "runs": runs,
            "agent_peak_rss_bytes": [peak_rss_bytes(a.pid) for a in agents],
            "coordinator_peak_rss_bytes": peak_rss_bytes(server.proc.pid),
            "agent_weight_bytes": shard_field(view, "weight_bytes"),
            "agent_resident_weight_bytes": shard_field(view, "resident_weight_bytes"),
            "agent_threads": threads,
            "agent_matmul_gflops": [a["matmul_gflops"] for a in agents_by_name(view)],
            "hub_weight_bytes": view["hub"]["weight_bytes"],
        }


# ------------------------------------------------------------------ transformers


def load_hf(model_dir: Path, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()


def hf_generate_s(model: Any, ids: torch.Tensor, new_tokens: int) -> tuple[float, int]:
    """Seconds for greedy `generate` of exactly `new_tokens` tokens, and the count made."""
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            pad_token_id=model.generation_config.eos_token_id,
        )  # fmt: skip
    return time.perf_counter() - start, out.shape[1] - ids.shape[1]


def hf_run(model: Any, ids: torch.Tensor) -> Run:
    ttft_s, _ = hf_generate_s(model, ids, 1)
    total_s, made = hf_generate_s(model, ids, NEW_TOKENS)
    return Run(ttft_s=ttft_s, decode_s=total_s - ttft_s, num_tokens=made)


def measure_hf(
    cfg: BenchConfig, model_dir: Path, prompt: list[int], say: Callable[[str], None]
) -> dict[int, list[Run]]:
    """Runs at each of `cfg.hf_threads` torch thread counts."""
    model = load_hf(model_dir, getattr(torch, cfg.dtype))
    ids = torch.tensor([prompt])  # [1, T]
    by_threads = {}
    for threads in cfg.hf_threads:
        torch.set_num_threads(threads)
        say(f"transformers, {threads} torch threads; timing")
        by_threads[threads] = timed_runs(lambda: hf_run(model, ids), cfg.num_runs, say)
    return by_threads


# ------------------------------------------------------------------ driver


def timed_runs(once: Callable[[], Run], num_runs: int, say: Callable[[str], None]) -> list[Run]:
    once()  # warm-up
    runs = []
    for i in range(num_runs):
        runs.append(once())
        r = runs[-1]
        say(f"  run {i + 1}/{num_runs}: ttft {r.ttft_s * 1e3:.0f} ms, {r.tokens_per_s:.1f} tok/s")
    return runs


def summarize(runs: Sequence[Run]) -> dict[str, Any]:
    rates = [r.tokens_per_s for r in runs]
    ttfts = [r.ttft_s for r in runs]
    return {
        "tokens_per_s": statistics.median(rates),
        "tokens_per_s_min": min(rates),
        "tokens_per_s_max": max(rates),
        "ttft_s": statistics.median(ttfts),
        "ttft_s_min": min(ttfts),
        "ttft_s_max": max(ttfts),
        "num_tokens": [r.num_tokens for r in runs],
    }


def run_benchmark(cfg: BenchConfig, say: Callable[[str], None]) -> dict[str, Any]:
    machine = machine_info()
    model_dir = resolve_model(cfg.model, cfg.cache_dir)
    prompt = prompt_ids(model_dir)
    edge = measure_edge(cfg, prompt, say)
    machine["load_avg_1m_after_edge"] = os.getloadavg()[0]  # the phases may see other loads
    hf_by_threads = {t: summarize(r) for t, r in measure_hf(cfg, model_dir, prompt, say).items()}
    # the peer is transformers at its best, per figure: decode and TTFT may differ in threads
    hf_threads = max(hf_by_threads, key=lambda t: hf_by_threads[t]["tokens_per_s"])
    ttft_threads = min(hf_by_threads, key=lambda t: hf_by_threads[t]["ttft_s"])
    hf = hf_by_threads[hf_threads]
    e = summarize(edge["runs"])
    layer_bytes = layer_weight_bytes(model_dir, getattr(torch, cfg.dtype))
    fraction = max(edge["agent_weight_bytes"]) / layer_bytes
    ratio = e["tokens_per_s"] / hf["tokens_per_s"]
    machine["load_avg_1m_end"] = os.getloadavg()[0]
    return {
        "model": cfg.model,
        "agents": cfg.num_agents,
        "edge_tokens_per_s": e["tokens_per_s"],
        "hf_tokens_per_s": hf["tokens_per_s"],
        "ratio": ratio,
        "edge_ttft_s": e["ttft_s"],
        "hf_ttft_s": hf_by_threads[ttft_threads]["ttft_s"],
        "agent_peak_rss_bytes": edge["agent_peak_rss_bytes"],
        "agent_weight_bytes": edge["agent_weight_bytes"],
        "layer_weight_bytes": layer_bytes,
        "max_agent_weight_fraction": fraction,
        "bar": {
            "ratio_ge_0.8": ratio >= BAR_RATIO,
            "weight_fraction_le_0.4": fraction <= BAR_WEIGHT_FRACTION,
        },
        "dtype": cfg.dtype,
        "prompt_tokens": len(prompt),
        "runs": cfg.num_runs,
        "edge": e,
        "hf": hf,  # at hf_threads
        "hf_threads": hf_threads,
        "hf_ttft_threads": ttft_threads,
        "hf_by_threads": {str(t): v for t, v in hf_by_threads.items()},
        "edge_agent_threads": edge["agent_threads"],
        "edge_agent_matmul_gflops": edge["agent_matmul_gflops"],
        "agent_resident_weight_bytes": edge["agent_resident_weight_bytes"],
        "coordinator_peak_rss_bytes": edge["coordinator_peak_rss_bytes"],
        "hub_weight_bytes": edge["hub_weight_bytes"],
        "machine": machine,
    }


def engines(result: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    threads = ",".join(str(t) for t in sorted(set(result["edge_agent_threads"])))
    rows = [(f"edgecluster ({threads} thr/agent)", result["edge"])]
    rows += [(f"transformers ({t} thr)", s) for t, s in result["hf_by_threads"].items()]
    return rows


def engine_table(result: dict[str, Any]) -> str:
    rows = [
        {
            "engine": name,
            "tok/s": s["tokens_per_s"],
            "tok/s min": s["tokens_per_s_min"],
            "tok/s max": s["tokens_per_s_max"],
            "ttft ms": s["ttft_s"] * 1e3,
            "ttft ms min": s["ttft_s_min"] * 1e3,
            "ttft ms max": s["ttft_s_max"] * 1e3,
            "tokens": ",".join(str(n) for n in sorted(set(s["num_tokens"]))),
        }
        for name, s in engines(result)
    ]
    return format_table(rows, list(rows[0]))


def agent_table(result: dict[str, Any]) -> str:
    columns = zip(
        result["agent_weight_bytes"],
        result["agent_peak_rss_bytes"],
        result["edge_agent_matmul_gflops"],
        strict=True,
    )
    rows = [
        {"agent": i, "weight MiB": w / 2**20, "peak RSS MiB": r / 2**20, "GFLOPS": g}
        for i, (w, r, g) in enumerate(columns)
    ]
    return format_table(rows, ["agent", "weight MiB", "peak RSS MiB", "GFLOPS"])


def report(result: dict[str, Any]) -> str:
    b, m = result["bar"], result["machine"]
    return "\n".join(
        [
            f"{result['model']}, {result['dtype']}, {result['agents']} agents, "
            f"{result['prompt_tokens']}-token prompt, {NEW_TOKENS} new tokens, "
            f"medians of {result['runs']} runs; load {m['load_avg_1m']:.2f} -> "
            f"{m['load_avg_1m_after_edge']:.2f} (edge) -> {m['load_avg_1m_end']:.2f} (hf) "
            f"on {m['cores']} cores",
            engine_table(result),
            "",
            agent_table(result),
            f"layer weights {result['layer_weight_bytes'] / 2**20:.1f} MiB; "
            f"coordinator peak RSS {result['coordinator_peak_rss_bytes'] / 2**20:.1f} MiB",
            "",
            f"bar: ratio {result['ratio']:.2f} against transformers at its fastest "
            f"({result['hf_threads']} threads) (>= {BAR_RATIO}): {b['ratio_ge_0.8']}; "
            f"max agent weight fraction {result['max_agent_weight_fraction']:.3f} "
            f"(<= {BAR_WEIGHT_FRACTION}): {b['weight_fraction_le_0.4']}",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 timed runs instead of 7")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="name, checkpoint dir or .gguf")
    parser.add_argument("--agents", type=int, default=3, help="local agents (default 3)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--cache-dir", type=Path, help="default: $EDGE_CACHE_DIR or ~/.cache")
    parser.add_argument(
        "--hf-threads",
        default=f"1,{os.cpu_count() or 1}",
        help="torch thread counts to time transformers at; the fastest is the peer",
    )
    args = parser.parse_args(argv)
    cfg = BenchConfig(
        model=args.model,
        num_agents=args.agents,
        dtype=args.dtype,
        num_runs=3 if args.quick else 7,
        cache_dir=args.cache_dir or default_cache_dir(),
        hf_threads=tuple(sorted({int(t) for t in args.hf_threads.split(",") if t.strip()})),
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop the cluster
    say = (lambda _: None) if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    result = run_benchmark(cfg, say)
    result["mode"] = "quick" if args.quick else "full"
    if not args.json:
        print(report(result))
    print_json_last(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
