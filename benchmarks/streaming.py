"""Memory-limited decode: edgecluster's streaming agents against Accelerate's disk offload.

    python benchmarks/streaming.py [--quick] [--json] [--keep-model] [--bench-dir DIR]

A Llama-shaped checkpoint with random bf16 weights (random_llama.py; quick: the
TinyLlama-1.1B shape, 2.2 GB; full: the Llama-2-7B shape, 13.5 GB) is written under
the bench dir ($EDGE_BENCH_DIR or /tmp/edgecluster-bench) and reused while its shape
matches. Every process below runs as an emulated device (cgroup v1: memory cap
without swap, CFS quota, read throttle on the disk holding the bench dir); quick:
550 MiB, 0.45 core, 200 MB/s; full: 2 GiB, 0.45 core, 400 MB/s. In one run:

1. edgecluster, 4 agents (`edge-agent join --memory-limit CAP --threads 1`), one
   device each, and the coordinator on a device of its own holding embedding and LM
   head (cap 2 * vocab * hidden * 2 bytes + 600 MiB, 0.45 core, same read rate);
2. the same with 1 agent: pure streaming, no parallelism;
3. transformers + Accelerate disk offload (offload_child.py) on one device:
   `device_map="auto"`, `max_memory={"cpu": CAP - 400 MiB}`, `offload_folder`;
4. the device's raw sequential read rate (direct_read.py: O_DIRECT, 8 MiB reads).

The page cache is dropped before each measurement. Each run generates 9 tokens
greedily (bf16 compute on both sides) after the same 8-token prompt: TTFT is the
time to the first token, s/token the median of the 8 gaps after it. During those 8
tokens the storage reads of the measured processes (/proc/PID/io read_bytes) give
bytes read per token and the read rate. Peak RSS is VmHWM of each process.

Bar (issue 4, quick mode): speedup_vs_accelerate >= 3, every edgecluster process's
peak RSS under its cap, io_efficiency (run 2's read rate / raw rate) >= 0.6. The
table comes first; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate_peer import AcceleratePeer
from common import machine_info, peak_rss_bytes, print_json_last
from emulated_cluster import ClusterLayout, EmulatedCluster
from random_llama import LLAMA2_7B, TINYLLAMA_1B, LlamaShape, make_random_llama
from streaming_report import report
from token_trace import TokenTrace, decode_figures, trace_completion

from edgecluster.device.emulated import (
    DeviceLimits,
    EmulatedDevice,
    available,
    cleanup_stale,
    drop_page_cache,
)

MiB = 1 << 20
PROMPT = [1, 450, 1200, 3000, 77, 901, 15, 6000]  # token ids; the model has no tokenizer
NEW_TOKENS = 9
MAX_CONTEXT = 256
COORDINATOR_RUNTIME_BYTES = 600 * MiB
CGROUP_PREFIX = "sbench-"
RUN_NAMES = ("edge", "edge1", "accelerate")
Say = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class Mode:
    name: str
    shape: LlamaShape
    cap_bytes: int
    cpus: float
    read_bytes_per_s: int
    num_agents: int = 4
    ready_timeout_s: float
    accelerate_timeout_s: float

    def device(self, memory_bytes: int | None = None) -> DeviceLimits:
        return DeviceLimits(
            memory_bytes=memory_bytes or self.cap_bytes,
            cpus=self.cpus,
            read_bytes_per_s=self.read_bytes_per_s,
        )

    @property
    def coordinator_cap_bytes(self) -> int:
        s = self.shape
        return 2 * s.vocab_size * s.hidden_size * 2 + COORDINATOR_RUNTIME_BYTES


QUICK = Mode(
    name="quick", shape=TINYLLAMA_1B, cap_bytes=550 * MiB, cpus=0.45,
    read_bytes_per_s=200_000_000, ready_timeout_s=1800, accelerate_timeout_s=480,
)  # fmt: skip
FULL = Mode(
    name="full", shape=LLAMA2_7B, cap_bytes=2048 * MiB, cpus=0.45,
    read_bytes_per_s=400_000_000, ready_timeout_s=5400, accelerate_timeout_s=2400,
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    mode: Mode
    bench_dir: Path
    keep_model: bool

    @property
    def model_dir(self) -> Path:
        return self.bench_dir / f"model-{self.mode.shape.name}"

    @property
    def work_dir(self) -> Path:
        return self.bench_dir / f"work-{self.mode.name}"


# ------------------------------------------------------------------ edgecluster runs


def measure_edge(cfg: BenchConfig, name: str, num_agents: int, say: Say) -> dict[str, Any]:
    """Run 1 or 2: the cluster on emulated devices, one streamed completion."""
    mode = cfg.mode
    layout = ClusterLayout(
        tag=f"{CGROUP_PREFIX}{name}", model_dir=cfg.model_dir, work_dir=cfg.work_dir / name,
        num_agents=num_agents, agent_limits=mode.device(),
        coordinator_limits=mode.device(mode.coordinator_cap_bytes), max_context=MAX_CONTEXT,
    )  # fmt: skip
    say(f"{name}: coordinator + {num_agents} agent(s), each an emulated device; waiting for ready")
    drop_page_cache()  # a cold start: the files each process reads are charged to its device
    with EmulatedCluster(layout) as cluster:
        ready_s = cluster.wait_ready(mode.ready_timeout_s, say)
        say(f"{name}: ready in {ready_s:.0f} s; dropping the page cache, then generating")
        drop_page_cache()
        pids = {p.name: p.pid for p in cluster.agents}
        trace = trace_completion(cluster.server, PROMPT, NEW_TOKENS, pids)
        time.sleep(1.5)  # a heartbeat or two, so the cluster view has the decode's read rate
        _, view = cluster.server.get_json("/v1/cluster")
        processes = {p.name: process_figures(p.pid, p.device) for p in cluster.processes()}
        for proc_name, kinds in cluster.rss.peaks.items():
            processes[proc_name] |= {f"peak_rss_{k}_bytes": v for k, v in kinds.items()}
        for agent in cluster.agents:
            processes[agent.name]["window_log"] = window_log_line(agent.log_path)
    result = decode_figures(trace) | {"ready_s": ready_s, "processes": processes}
    result["agents"] = agent_views(view)
    say(f"{name}: {result['s_per_token']:.2f} s/token, TTFT {result['ttft_s']:.2f} s")
    return result


def process_figures(pid: int, device: EmulatedDevice) -> dict[str, Any]:
    return {
        "peak_rss_bytes": peak_rss_bytes(pid),
        "cap_bytes": device.limits.memory_bytes,
        "cgroup_peak_bytes": device.peak_memory_bytes(),  # v1 counts page cache too
        "oom_killed": device.oom_killed(),
    }


def agent_views(view: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What each agent reports in GET /v1/cluster: streaming, window, read rate, peak RSS."""
    out = {}
    for agent in view.get("agents", []):
        shard = agent.get("shard") or {}
        out[agent["name"]] = {
            "streaming": shard.get("streaming"),
            "window_blocks": shard.get("window_blocks"),
            "weight_bytes": shard.get("weight_bytes"),
            "resident_weight_bytes": shard.get("resident_weight_bytes"),
            "reported_read_bytes_per_s": shard.get("read_bytes_per_s"),
            "reported_peak_rss_bytes": agent.get("peak_rss_bytes"),
            "profiled_disk_read_bytes_per_s": agent.get("disk_read_bytes_per_s"),
            "profiled_matmul_gflops": agent.get("matmul_gflops"),
        }
    return out


def window_log_line(log_path: Path) -> str | None:
    """The agent's own account of its window choice and expected stall (its last one)."""
    marker = "streaming window: "
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if marker in ln]
    return lines[-1].split(marker, 1)[1] if lines else None


def guarded(run: Callable[[], dict[str, Any]], name: str, say: Say) -> dict[str, Any]:
    """A run's figures, or its failure in words: one failed run does not hide the others."""
    try:
        return run() | {"status": "measured"}
    except (RuntimeError, TimeoutError, OSError, ValueError) as exc:
        say(f"{name}: FAILED: {exc}")
        return {"status": f"failed: {exc}"}


# ------------------------------------------------------------------ peers


def measure_accelerate(cfg: BenchConfig, say: Say) -> dict[str, Any]:
    """Run 3: transformers + Accelerate disk offload on one device."""
    mode = cfg.mode
    peer = AcceleratePeer(
        model_dir=cfg.model_dir, work_dir=cfg.work_dir / "accelerate", limits=mode.device(),
        cgroup_name=f"{CGROUP_PREFIX}accelerate", timeout_s=mode.accelerate_timeout_s,
    )  # fmt: skip
    outcome = peer.run(PROMPT, NEW_TOKENS, say)
    trace = TokenTrace(
        times_s=outcome.times_s, tokens=outcome.tokens,
        read_bytes_first={"accelerate": outcome.read_bytes[0] if outcome.read_bytes else 0},
        read_bytes_last={"accelerate": outcome.read_bytes[-1] if outcome.read_bytes else 0},
    )  # fmt: skip
    figures = decode_figures(trace) if outcome.times_s else {"ttft_s": None, "s_per_token": None}
    if outcome.status != "measured":
        figures["partial_s_per_token"] = figures.get("s_per_token")
        figures["s_per_token"] = None  # an unfinished run gives no figure
    say(f"accelerate: {outcome.status}")
    return figures | outcome.details()


def measure_raw_read(cfg: BenchConfig, say: Say) -> dict[str, Any]:
    """Run 4: O_DIRECT sequential reads of the largest checkpoint file on one device."""
    largest = max(cfg.model_dir.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    script = Path(__file__).with_name("direct_read.py")
    drop_page_cache()
    limits = cfg.mode.device()
    with EmulatedDevice(f"{CGROUP_PREFIX}raw-read", limits, io_path=cfg.work_dir) as device:
        proc = device.popen([sys.executable, str(script), str(largest)], stdout=-1)
        out, _ = proc.communicate(timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"direct_read.py exited with {proc.returncode}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["read_rate_bytes_per_s"] = result["bytes"] / result["seconds"]
    result["file"] = str(largest)
    say(f"raw read: {result['read_rate_bytes_per_s'] / 1e6:.0f} MB/s over {largest.name}")
    return result


# ------------------------------------------------------------------ driver


def run_benchmark(cfg: BenchConfig, say: Say) -> dict[str, Any]:
    machine = machine_info()
    cleanup_stale(CGROUP_PREFIX)
    say(f"model {cfg.mode.shape.name} ({cfg.mode.shape.num_bytes / 1e9:.2f} GB) in {cfg.model_dir}")
    make_random_llama(cfg.mode.shape, cfg.model_dir)
    runs = {
        "edge": guarded(lambda: measure_edge(cfg, "edge", cfg.mode.num_agents, say), "edge", say),
    }
    if not cfg.keep_model:
        remove_shards(cfg)  # full mode: 13 GB per run
    runs |= {
        "edge1": guarded(lambda: measure_edge(cfg, "edge1", 1, say), "edge1", say),
        "accelerate": guarded(lambda: measure_accelerate(cfg, say), "accelerate", say),
        "raw": guarded(lambda: measure_raw_read(cfg, say), "raw read", say),
    }
    machine["load_avg_1m_end"] = os.getloadavg()[0]
    return summarize(cfg, runs, machine)


def summarize(
    cfg: BenchConfig, runs: dict[str, dict[str, Any]], machine: dict[str, Any]
) -> dict[str, Any]:
    edge, edge1, acc, raw = runs["edge"], runs["edge1"], runs["accelerate"], runs["raw"]
    speedup = _ratio(acc.get("s_per_token"), edge.get("s_per_token"))
    io_eff = _ratio(edge1.get("read_rate_bytes_per_s"), raw.get("read_rate_bytes_per_s"))
    peaks, caps, oom = _process_table(runs)
    both_ran = edge.get("status") == edge1.get("status") == "measured"
    edge_procs = [k for k in peaks if k != "accelerate"]
    over = [k for k in edge_procs if not _under(peaks[k], caps[k]) or oom[k]]
    return {
        "model_bytes": cfg.mode.shape.num_bytes,
        "cap_bytes": cfg.mode.cap_bytes,
        "agents": cfg.mode.num_agents,
        "edge_s_per_token": edge.get("s_per_token"),
        "edge1_s_per_token": edge1.get("s_per_token"),
        "accelerate_s_per_token": acc.get("s_per_token"),
        "speedup_vs_accelerate": speedup,
        "io_efficiency": io_eff,
        "edge_ttft_s": edge.get("ttft_s"),
        "edge1_ttft_s": edge1.get("ttft_s"),
        "accelerate_ttft_s": acc.get("ttft_s"),
        "accelerate_status": acc.get("status"),
        "bytes_read_per_token": {
            k: runs[k].get("bytes_read_per_token") for k in runs if k != "raw"
        },
        "read_rate_bytes_per_s": _read_rates(runs),
        "peak_rss_bytes": peaks,
        "caps_bytes": caps,
        "oom_killed": oom,
        "rss_over_cap": over,
        "peak_rss_anon_bytes": _anon_peaks(runs),
        "agent_streaming": _agent_streaming(runs),
        "bar": {
            "speedup_ge_3": speedup is not None and speedup >= 3,
            "rss_under_caps": both_ran and not over,
            "io_efficiency_ge_0.6": io_eff is not None and io_eff >= 0.6,
        },
        "mode": cfg.mode.name,
        "device": {"cpus": cfg.mode.cpus, "read_bytes_per_s": cfg.mode.read_bytes_per_s},
        "coordinator_cap_bytes": cfg.mode.coordinator_cap_bytes,
        "prompt": PROMPT,
        "new_tokens": NEW_TOKENS,
        "runs": runs,
        "machine": machine,
    }


def _anon_peaks(runs: dict[str, dict[str, Any]]) -> dict[str, int | None]:
    """Peak anonymous RSS per process (sampled): VmHWM less mapped file pages."""
    peaks = {
        _process_key(run, name): p.get("peak_rss_anon_bytes")
        for run in ("edge", "edge1")
        for name, p in runs[run].get("processes", {}).items()
    }
    if "peak_rss_anon_bytes" in runs["accelerate"]:
        peaks["accelerate"] = runs["accelerate"]["peak_rss_anon_bytes"]
    return peaks


def _under(peak: int | None, cap: int | None) -> bool:
    return peak is not None and cap is not None and peak < cap


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def _process_key(run: str, name: str) -> str:
    """ "coordinator", "agent-i" for run 1; "edge1-coordinator", "edge1-agent" for run 2."""
    role = name.removeprefix(f"{CGROUP_PREFIX}{run}-")
    if run == "edge":
        return role
    return f"{run}-{'agent' if role == 'agent-0' else role}"


def _agent_streaming(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per agent, what GET /v1/cluster said: streaming, window, read rate, peak RSS."""
    return {
        _process_key(run, name): view
        for run in ("edge", "edge1")
        for name, view in runs[run].get("agents", {}).items()
    }


def _read_rates(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    rates: dict[str, Any] = {k: runs[k].get("read_rate_bytes_per_s") for k in runs}
    for run in ("edge", "edge1"):
        for name, rate in runs[run].get("read_rate_per_process", {}).items():
            rates[_process_key(run, name)] = rate
    return rates


def _process_table(
    runs: dict[str, dict[str, Any]],
) -> tuple[dict[str, int | None], dict[str, int | None], dict[str, bool]]:
    """Peak RSS, cap and OOM flag per process."""
    peaks: dict[str, int | None] = {}
    caps: dict[str, int | None] = {}
    oom: dict[str, bool] = {}
    for run in ("edge", "edge1"):
        for name, p in runs[run].get("processes", {}).items():
            key = _process_key(run, name)
            peaks[key], caps[key], oom[key] = p["peak_rss_bytes"], p["cap_bytes"], p["oom_killed"]
    acc = runs["accelerate"]
    if "peak_rss_bytes" in acc:
        peaks["accelerate"], caps["accelerate"] = acc["peak_rss_bytes"], acc.get("cap_bytes")
        oom["accelerate"] = bool(acc.get("oom_killed"))
    return peaks, caps, oom


def remove_outputs(cfg: BenchConfig) -> None:
    """Without --keep-model: the model and the agents' shard copies go; logs stay."""
    shutil.rmtree(cfg.model_dir, ignore_errors=True)
    remove_shards(cfg)


def remove_shards(cfg: BenchConfig) -> None:
    """The agents' data dirs (their shard copies) of every run so far."""
    for data_dir in cfg.work_dir.glob("*/*-agent-*"):
        if data_dir.is_dir():
            shutil.rmtree(data_dir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="TinyLlama shape, 550 MiB devices")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--keep-model", action="store_true", help="keep model and shards")
    parser.add_argument("--bench-dir", type=Path, help="default $EDGE_BENCH_DIR or /tmp/...")
    args = parser.parse_args(argv)
    reason = available()
    if reason is not None:
        print(f"streaming benchmark: emulated devices unavailable: {reason}", file=sys.stderr)
        return 2
    bench_dir = args.bench_dir or Path(os.environ.get("EDGE_BENCH_DIR", "/tmp/edgecluster-bench"))
    cfg = BenchConfig(
        mode=QUICK if args.quick else FULL, bench_dir=bench_dir, keep_model=args.keep_model
    )
    say = (lambda _: None) if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        result = run_benchmark(cfg, say)
    finally:
        cleanup_stale(CGROUP_PREFIX)
        if not cfg.keep_model:
            remove_outputs(cfg)
    if not args.json:
        print(report(result))
    print_json_last(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
