"""The training benchmark's figures from its per-step logs: summaries, bars, table, plot.

Pure except `plot`. A run's log is what `edge-coordinator train --log-json` wrote:
one object per step ({"step", "loss", "eval_loss", "iteration_s",
"predicted_iteration_s", "tokens", "tokens_per_s", "elapsed_s", "busy", ...}).

- iteration time, predicted time, tokens/s: medians over the steps after the first
  WARMUP_FRACTION of them (at least one step is skipped when there are two or more);
- a loss curve is the training loss smoothed by a trailing mean of
  `smoothing_window(steps)` steps (every schedule sees the same batches at the same
  step, so the curves compare step for step);
- final loss: the smoothed loss at the last step (equal steps for every schedule);
- loss at equal wall-clock time: each smoothed curve read, by linear interpolation
  over `elapsed_s`, at the time the fastest schedule needed for all its steps.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

WARMUP_FRACTION = 0.2
BAR_REDUCTION_VS_GPIPE = 0.35
BAR_REDUCTION_VS_RANDOM = 0.10
BAR_LOSS_VS_GPIPE = 0.05
BAR_PREDICTION_ERROR = 0.25


def read_log(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The step objects of a --log-json file and its closing {"event": "done"} (or None)."""
    steps: list[dict[str, Any]] = []
    done = None
    if not path.exists():
        return steps, done
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        obj = json.loads(line)
        if obj.get("event") == "done":
            done = obj
        elif "step" in obj and "loss" in obj:
            steps.append(obj)
    return steps, done


def smoothing_window(num_steps: int) -> int:
    return max(1, min(10, num_steps // 5))


def trailing_mean(values: Sequence[float], window: int) -> list[float]:
    """out[i] = mean of values[max(0, i - window + 1) .. i]."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def value_at(times: Sequence[float], values: Sequence[float], t: float) -> float:
    """`values` linearly interpolated at time `t` (times ascending; clamped at both ends)."""
    if not times or len(times) != len(values):
        raise ValueError("need as many values as times, at least one")
    if t <= times[0]:
        return values[0]
    for i in range(1, len(times)):
        if t <= times[i]:
            span = times[i] - times[i - 1]
            frac = (t - times[i - 1]) / span if span > 0 else 1.0
            return values[i - 1] + frac * (values[i] - values[i - 1])
    return values[-1]


def steady(steps: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The steps after warm-up."""
    skip = max(1 if len(steps) > 1 else 0, round(len(steps) * WARMUP_FRACTION))
    return list(steps[skip:])


def loss_curve(steps: Sequence[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """(elapsed_s, smoothed loss) per step."""
    losses = [float(s["loss"]) for s in steps]
    return [float(s["elapsed_s"]) for s in steps], trailing_mean(
        losses, smoothing_window(len(losses))
    )


def summarize_run(steps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One schedule's figures from its step log (no equal-time figure yet)."""
    if not steps:
        raise ValueError("the run logged no step")
    warm = steady(steps)
    measured = statistics.median(float(s["iteration_s"]) for s in warm)
    predicted = [float(s["predicted_iteration_s"]) for s in warm if s.get("predicted_iteration_s")]
    evals = [float(s["eval_loss"]) for s in steps if s.get("eval_loss") is not None]
    busy: dict[str, list[float]] = {}
    for s in warm:
        for agent, fraction in (s.get("busy") or {}).items():
            busy.setdefault(agent, []).append(float(fraction))
    _, smoothed = loss_curve(steps)
    out: dict[str, Any] = {
        "steps": len(steps),
        "iteration_s": measured,
        "predicted_iteration_s": statistics.median(predicted) if predicted else None,
        "tokens_per_s": statistics.median(float(s["tokens_per_s"]) for s in warm),
        "final_loss": smoothed[-1],
        "final_eval_loss": evals[-1] if evals else None,
        "elapsed_s": float(steps[-1]["elapsed_s"]),
        "busy": {a: statistics.mean(v) for a, v in sorted(busy.items())},
    }
    out["prediction_error"] = (
        out["predicted_iteration_s"] / measured - 1 if predicted and measured > 0 else None
    )
    return out


def add_equal_time(
    summaries: dict[str, dict[str, Any]], logs: Mapping[str, Sequence[dict[str, Any]]]
) -> float:
    """Sets each summary's `loss_at_equal_time` at the shortest run's duration; returns it."""
    budget = min(float(steps[-1]["elapsed_s"]) for steps in logs.values())
    for name, steps in logs.items():
        times, smoothed = loss_curve(steps)
        summaries[name]["loss_at_equal_time"] = value_at(times, smoothed, budget)
    return budget


def reductions(summaries: Mapping[str, dict[str, Any]], base: str) -> dict[str, float]:
    """1 - iteration_s / base's iteration_s, for every schedule but `base`."""
    ref = summaries[base]["iteration_s"]
    return {n: 1 - s["iteration_s"] / ref for n, s in summaries.items() if n != base}


def bars(
    summaries: Mapping[str, dict[str, Any]],
    *,
    skippipe: str = "skippipe-33",
    gpipe: str = "gpipe",
    random_skip: str = "random-skip-33",
) -> dict[str, dict[str, Any]]:
    """The issue's bars: {name: {"value", "target", "met"}}; a missing run is not met."""
    sp, gp, rs = summaries.get(skippipe), summaries.get(gpipe), summaries.get(random_skip)
    out: dict[str, dict[str, Any]] = {}

    def bar(name: str, value: float | None, target: float, at_most: bool) -> None:
        met = value is not None and (value <= target if at_most else value >= target)
        out[name] = {"value": value, "target": target, "met": met}

    bar("skippipe_vs_gpipe_reduction", _ratio_gain(sp, gp), BAR_REDUCTION_VS_GPIPE, False)
    bar("skippipe_vs_random_skip_reduction", _ratio_gain(sp, rs), BAR_REDUCTION_VS_RANDOM, False)
    loss_excess = sp["final_loss"] / gp["final_loss"] - 1 if sp and gp else None
    bar("final_loss_vs_gpipe_excess", loss_excess, BAR_LOSS_VS_GPIPE, True)
    equal = (
        sp["loss_at_equal_time"] - gp["loss_at_equal_time"]
        if sp and gp and "loss_at_equal_time" in sp and "loss_at_equal_time" in gp
        else None
    )
    out["loss_at_equal_time_below_gpipe"] = {
        "value": equal,
        "target": 0.0,
        "met": equal is not None and equal < 0,
    }
    errors = [s.get("prediction_error") for s in summaries.values()]
    worst = (
        max(abs(e) for e in errors if e is not None)
        if errors and all(e is not None for e in errors)
        else None
    )
    bar("simulator_error_max", worst, BAR_PREDICTION_ERROR, True)
    return out


def _ratio_gain(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    return 1 - a["iteration_s"] / b["iteration_s"] if a and b else None


def format_report(result: Mapping[str, Any]) -> str:
    """The human-readable table: one row per schedule, then robustness and bars."""
    lines = ["schedule        iter s   pred s   err   tok/s   loss@N  loss@T  eval@N  peak RSS"]
    for name, s in result["schedules"].items():
        if "error" in s:
            lines.append(f"{name:<14} failed: {s['error'].splitlines()[0][:120]}")
            continue
        rss = max((s.get("peak_rss_bytes") or {}).values(), default=0) / 2**20
        lines.append(
            f"{name:<14} {s['iteration_s']:7.2f}  {_num(s['predicted_iteration_s'], 7, 2)} "
            f"{_pct(s['prediction_error'])}  {s['tokens_per_s']:6.0f}  {s['final_loss']:6.3f}  "
            f"{s.get('loss_at_equal_time', float('nan')):6.3f}  "
            f"{_num(s['final_eval_loss'], 6, 3)}  {rss:5.0f} MiB"
        )
    lines.append(f"loss@T: at {result.get('equal_time_s', 0):.0f} s, the fastest run's duration")
    for name, per in (result.get("robustness") or {}).items():
        cells = ", ".join(f"{k} layers: ppl {v['perplexity']:.2f}" for k, v in per.items())
        lines.append(f"robustness {name}: {cells}")
    for name, b in result.get("bars", {}).items():
        value = "n/a" if b["value"] is None else f"{b['value']:.3f}"
        lines.append(
            f"bar {name}: {value} (target {b['target']}) {'met' if b['met'] else 'NOT met'}"
        )
    return "\n".join(lines)


def _num(value: float | None, width: int, digits: int) -> str:
    return f"{value:{width}.{digits}f}" if value is not None else "n/a".rjust(width)


def _pct(value: float | None) -> str:
    return f"{value * 100:+4.0f}%" if value is not None else "  n/a"


def plot(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: Path, title: str
) -> str:
    """Loss against wall-clock time, one line per schedule; what was done, as a sentence."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (make bench-deps)"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (times, losses) in curves.items():
        ax.plot(times, losses, label=name)
    ax.set_xlabel("wall-clock time since training started (s)")
    ax.set_ylabel("training loss (trailing mean)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return f"loss curves: {path}"
