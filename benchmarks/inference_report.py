"""The bars and the human-readable report of `inference.py` (pure functions of its result).

Bars are True or False where the runs they need were made, None (printed "not run")
where they were not: e.g. the int8 bar needs fp32 and int8 at 3 agents.
"""

from __future__ import annotations

from typing import Any

from common import format_table

# issue 15
BAR_RATIO_3_FP32 = 2.0  # 3 agents, fp32: decode >= 2x transformers
BAR_BANDWIDTH_1_FP32 = 0.6  # 1 agent, fp32: >= 60% of the measured memory bandwidth
BAR_INT8_SPEEDUP_3 = 1.6  # 3 agents: int8 decode >= 1.6x fp32
# issue 3 (3 agents, fp32)
BAR_RATIO, BAR_WEIGHT_FRACTION = 0.8, 0.4


def find_run(runs: list[dict[str, Any]], agents: int, weights: str) -> dict[str, Any] | None:
    return next((r for r in runs if r["agents"] == agents and r["weights"] == weights), None)


def bars(runs: list[dict[str, Any]]) -> dict[str, bool | None]:
    """Issue 15's bars over all runs, and issue 3's over the 3-agent fp32 run."""
    fp32_3, fp32_1 = find_run(runs, 3, "fp32"), find_run(runs, 1, "fp32")
    int8_3 = find_run(runs, 3, "int8")
    one_agent = [r for r in runs if r["agents"] == 1]
    return {
        "ratio_3_agents_fp32_ge_2.0": None
        if fp32_3 is None
        else fp32_3["ratio"] >= BAR_RATIO_3_FP32,
        "bandwidth_fraction_1_agent_fp32_ge_0.6": None
        if fp32_1 is None
        else fp32_1["bandwidth_fraction"] >= BAR_BANDWIDTH_1_FP32,
        "int8_ge_1.6x_fp32_at_3_agents": None
        if fp32_3 is None or int8_3 is None
        else int8_3["tokens_per_s"] >= BAR_INT8_SPEEDUP_3 * fp32_3["tokens_per_s"],
        "ttft_le_hf": all(r["ttft_s"] <= r["hf_ttft_s"] for r in runs),
        "one_agent_not_slower_than_hf": all(r["ratio"] >= 1.0 for r in one_agent)
        if one_agent
        else None,
        "ratio_ge_0.8": None if fp32_3 is None else fp32_3["ratio"] >= BAR_RATIO,
        "weight_fraction_le_0.4": None
        if fp32_3 is None
        else fp32_3["max_agent_weight_fraction"] <= BAR_WEIGHT_FRACTION,
    }


def runs_table(result: dict[str, Any]) -> str:
    rows = [
        {
            "agents": r["agents"],
            "weights": r["weights"],
            "tok/s": r["tokens_per_s"],
            "min-max": f"{r['tokens_per_s_min']:.1f}-{r['tokens_per_s_max']:.1f}",
            "HF tok/s": r["hf_tokens_per_s"],
            "ratio": f"{r['ratio']:.2f}",
            "ttft ms": r["ttft_s"] * 1e3,
            "ttft min-max": f"{r['ttft_s_min'] * 1e3:.0f}-{r['ttft_s_max'] * 1e3:.0f}",
            "HF ttft ms": r["hf_ttft_s"] * 1e3,
            "MB/token": r["bytes_per_token"] / 1e6,
            "GB/s": r["gb_per_s"],
            "of bw": f"{r['bandwidth_fraction']:.0%}",
        }
        for r in result["runs"]
    ]
    return format_table(rows, list(rows[0]))


def engine_table(result: dict[str, Any]) -> str:
    threads = ",".join(str(t) for t in sorted(set(result["edge_agent_threads"])))
    engines = [(f"edgecluster ({threads} thr/agent)", result["edge"])]
    engines += [(f"transformers ({t} thr)", s) for t, s in result["hf_by_threads"].items()]
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
        for name, s in engines
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


def bar_line(result: dict[str, Any]) -> str:
    shown = {True: "yes", False: "NO", None: "not run"}
    return "bar: " + "; ".join(f"{k}: {shown[v]}" for k, v in result["bar"].items())


def report(result: dict[str, Any], new_tokens: int) -> str:
    m, bw = result["machine"], result["memory_bandwidth"]
    return "\n".join(
        [
            f"{result['model']}, {result['prompt_tokens']}-token prompt, {new_tokens} new "
            f"tokens, medians of {result['repetitions']} repetitions; load "
            f"{m['load_avg_1m']:.2f} -> {m['load_avg_1m_after_edge']:.2f} (edge) -> "
            f"{m['load_avg_1m_end']:.2f} (hf) on {m['cores']} cores; memory bandwidth "
            f"{result['memory_bandwidth_gb_per_s']:.1f} GB/s (copy {bw['copy_gb_per_s']:.1f}, "
            f"triad {bw['triad_gb_per_s']:.1f}, best of {bw['repeats']})",
            runs_table(result),
            "",
            f"default run: {result['agents']} agents, {result['weights']} weights "
            f"({result['dtype']})",
            engine_table(result),
            "",
            agent_table(result),
            f"layer weights {result['layer_weight_bytes'] / 2**20:.1f} MiB "
            f"(max agent fraction {result['max_agent_weight_fraction']:.3f}); coordinator "
            f"peak RSS {result['coordinator_peak_rss_bytes'] / 2**20:.1f} MiB",
            *(f"note: {n}" for n in result["notes"]),
            "",
            bar_line(result),
        ]
    )
