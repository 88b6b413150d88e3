"""The streaming benchmark's human-readable tables, from its result dict (streaming.py)."""

from __future__ import annotations

from typing import Any

from common import format_table

MB = 1e6
MiB = 1 << 20
RUNS = (
    ("edge", "edgecluster, 4 agents"),
    ("edge1", "edgecluster, 1 agent"),
    ("accelerate", "transformers + Accelerate"),
)


def _num(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}"


def run_rows(result: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for key, label in RUNS:
        run = result["runs"][key]
        rows.append(
            {
                "run": label,
                "s/token": _num(run.get("s_per_token")),
                "TTFT s": _num(run.get("ttft_s")),
                "MB read/token": _num(run.get("bytes_read_per_token"), MB, 0),
                "read MB/s": _num(run.get("read_rate_bytes_per_s"), MB, 0),
                "tokens": str(len(run.get("tokens", []))),
                "status": str(run.get("status")),
            }
        )
    raw = result["runs"]["raw"]
    rows.append(
        {
            "run": "raw O_DIRECT read",
            "read MB/s": _num(raw.get("read_rate_bytes_per_s"), MB, 0),
            "status": str(raw.get("status")),
        }
    )
    return rows


def process_rows(result: dict[str, Any]) -> list[dict[str, str]]:
    rates = result["read_rate_bytes_per_s"]
    views = {
        **result["runs"]["edge"].get("agents", {}),
        **result["runs"]["edge1"].get("agents", {}),
    }
    views = {name.split("-", 1)[-1]: v for name, v in views.items()}  # drop the cgroup prefix
    rows = []
    for key, peak in result["peak_rss_bytes"].items():
        view = views.get(f"edge-{key}") or views.get(f"edge1-{key.removeprefix('edge1-')}-0") or {}
        rows.append(
            {
                "process": key,
                "peak RSS MiB": _num(peak, MiB, 0),
                "anon MiB": _num(result["peak_rss_anon_bytes"].get(key), MiB, 0),
                "cap MiB": _num(result["caps_bytes"].get(key), MiB, 0),
                "OOM": "yes" if result["oom_killed"].get(key) else "no",
                "shard MiB": _num(view.get("weight_bytes"), MiB, 0),
                "streams": str(view.get("streaming", "-")),
                "window": str(view.get("window_blocks", "-")),
                "decode read MB/s": _num(rates.get(key), MB, 0),
            }
        )
    return rows


def report(result: dict[str, Any]) -> str:
    m, bar = result["machine"], result["bar"]
    head = (
        f"{result['mode']} mode: model {result['model_bytes'] / 1e9:.2f} GB bf16, devices of "
        f"{result['cap_bytes'] / MiB:.0f} MiB, {result['device']['cpus']} core, "
        f"{result['device']['read_bytes_per_s'] / MB:.0f} MB/s; {len(result['prompt'])}-token "
        f"prompt, {result['new_tokens']} new tokens; load {m['load_avg_1m']:.2f} -> "
        f"{m['load_avg_1m_end']:.2f} on {m['cores']} cores"
    )
    runs, procs = run_rows(result), process_rows(result)
    lines = [head, format_table(runs, list(runs[0])), "", format_table(procs, list(procs[0]))]
    lines += [
        "",
        f"bar: speedup vs accelerate {_num(result['speedup_vs_accelerate'])} (>= 3): "
        f"{bar['speedup_ge_3']}; every edgecluster peak RSS under its cap: "
        f"{bar['rss_under_caps']}; io efficiency {_num(result['io_efficiency'])} (>= 0.6): "
        f"{bar['io_efficiency_ge_0.6']}",
    ]
    if result["rss_over_cap"]:
        lines.append(f"peak RSS (VmHWM) over its cap: {', '.join(result['rss_over_cap'])}")
    return "\n".join(lines)
