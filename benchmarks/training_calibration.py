"""The GFLOP/s each emulated device trains at, measured under its own CPU quota.

The planner and its simulator read a device's speed from the cluster file's
`gflops`; for the simulator's prediction to be comparable with a measured
iteration, that figure must be what the device achieves on this model's work. So
the benchmark measures it at start: a child process builds one decoder
layer of the benchmark's model (transformers' LlamaDecoderLayer, fp32, one torch
thread), runs forward + backward of one micro-batch, and counts the FLOPs as the
planner does (pipeline_cost.py: the layer's forward FLOPs times 1 + BACKWARD_FACTOR).
The child imports and warms up outside any limit (importing torch under 0.1 CPU
takes tens of seconds); then, device after device, the parent moves it into that
device's cgroups and asks for a figure. One at a time, each figure is the device's
quota rather than its share of a crowded box (the load average is in the report).

Child: python benchmarks/training_calibration.py --config CONFIG.json
           --micro-batch B --seq-len T --seconds S
prints "ready", then for each line on stdin prints {"gflops": X, "reps": N}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

from edgecluster.device.emulated import DeviceLimits, EmulatedDevice
from edgecluster.model_config import ModelConfig
from edgecluster.plan.cluster_file import ClusterSpec
from edgecluster.plan.pipeline_cost import BACKWARD_FACTOR, pipeline_costs

READY_TIMEOUT_S = 180.0


def layer_train_flops(config: dict[str, object], micro_batch: int, seq_len: int) -> float:
    """FLOPs of one decoder layer's forward + backward on one micro-batch, as planned."""
    costs = pipeline_costs(
        ModelConfig.from_hf_dict(config), micro_batch_size=micro_batch, seq_len=seq_len
    )
    return costs.layer_forward_flops * (1 + BACKWARD_FACTOR)


def _measure(config: dict[str, object], micro_batch: int, seq_len: int, seconds: float) -> None:
    """The child: build, warm up, say ready, wait, time reps for `seconds`, print JSON."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**config, "num_hidden_layers": 1})
    cfg._attn_implementation = "sdpa"
    layer, rope = LlamaDecoderLayer(cfg, 0), LlamaRotaryEmbedding(cfg)
    x = torch.randn(micro_batch, seq_len, cfg.hidden_size, requires_grad=True)  # [B, T, H]
    positions = torch.arange(seq_len).expand(micro_batch, seq_len)
    cos_sin = rope(x, positions)

    def once() -> None:
        out = layer(x, position_embeddings=cos_sin, attention_mask=None)
        (out[0] if isinstance(out, tuple) else out).square().mean().backward()

    once()
    flops = layer_train_flops(config, micro_batch, seq_len)
    print("ready", flush=True)
    for _ in sys.stdin:  # one line per device: the parent has moved us into its cgroups
        once()  # the first rep under the new quota
        reps, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds or reps < 2:
            once()
            reps += 1
        elapsed = time.perf_counter() - started
        print(json.dumps({"gflops": flops * reps / elapsed / 1e9, "reps": reps}), flush=True)


def calibrate(
    cluster: ClusterSpec,
    *,
    config_path: Path,
    micro_batch: int,
    seq_len: int,
    seconds: float,
    device_name: Callable[[str], str],
    say: Callable[[str], None],
) -> dict[str, float]:
    """Measured GFLOP/s per device of `cluster`, each under its cpu_quota and memory."""
    argv = [
        sys.executable, str(Path(__file__).resolve()), "--config", str(config_path),
        "--micro-batch", str(micro_batch), "--seq-len", str(seq_len), "--seconds", str(seconds),
    ]  # fmt: skip
    measured: dict[str, float] = {}
    with ExitStack() as stack:
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        stack.callback(_reap, proc)
        assert proc.stdin is not None and proc.stdout is not None
        line = proc.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"the calibration child did not start (said {line!r})")
        for spec in cluster.devices:  # one at a time, so that each measures its own quota
            limits = DeviceLimits(memory_bytes=spec.memory_bytes, cpus=spec.cpu_quota)
            device = stack.enter_context(EmulatedDevice(device_name(spec.name), limits))
            device.add_pid(proc.pid)
            proc.stdin.write("go\n")
            proc.stdin.flush()
            measured[spec.name] = _result(spec.name, proc)
            say(
                f"  {spec.name}: {spec.cpu_quota:.2f} CPU -> {measured[spec.name]:.1f} GFLOP/s "
                f"(file: {spec.gflops:g})"
            )
        proc.stdin.close()
        proc.wait(timeout=READY_TIMEOUT_S)
    return measured


def with_gflops(cluster: ClusterSpec, gflops: dict[str, float]) -> ClusterSpec:
    """`cluster` with each device's gflops replaced by the measured figure."""
    devices = tuple(replace(d, gflops=round(gflops[d.name], 2)) for d in cluster.devices)
    return replace(cluster, devices=devices)


def _result(name: str, proc: subprocess.Popen[str]) -> float:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    try:
        return float(json.loads(line)["gflops"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RuntimeError(f"calibration of {name} gave no result (said {line!r})") from exc


def _reap(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="the model's config.json")
    parser.add_argument("--micro-batch", type=int, required=True)
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    config = json.loads(args.config.read_text())
    _measure(config, args.micro_batch, args.seq_len, args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
