"""`edge-coordinator train` end to end: real coordinator and agent processes on loopback.

- `--dry-run --cluster FILE` prints the plan and every schedule's simulated time;
- killing one replica of a stage mid-run: training goes on over the survivors, no
  step is applied twice or lost, and the loss keeps falling;
  its final checkpoint serves through `edge-coordinator serve --model DIR`;
- fine-tuning SmolLM2-135M on Genesis 1-2 (KJV) lowers the held-out loss, and the
  checkpoint, tokenizer included, loads in transformers.
The text is the King James Bible (public domain), kept in tests/data.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.procs import ProcessPool, free_ports, procs, wait_until  # noqa: F401 (fixture)

GENESIS = Path(__file__).parent / "data" / "kjv_genesis_1_2.txt"
BYTE_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
}  # fmt: skip


def _train_argv(*args: str) -> list[str]:
    http, grpc = free_ports(2)
    return [
        sys.executable, "-m", "coordinator.cli", "train", "--no-mdns", "--token", "t",
        "--port", str(http), "--grpc-port", str(grpc), "--no-progress", *args,
    ]  # fmt: skip


def _run(argv: list[str], cwd: Path, timeout_s: float = 240) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout_s,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    assert done.returncode == 0, f"train failed ({done.returncode}):\n{done.stderr[-3000:]}"
    return done


def _log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _steps(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in log if "loss" in r]


def test_dry_run_prints_every_schedule_without_agents(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(BYTE_CONFIG))
    devices = [{"name": f"d{i}", "gflops": 5 + 5 * i, "memory": "2GiB", "cpu_quota": 0.5,
                "disk_read_mb_s": 100} for i in range(4)]  # fmt: skip
    cluster = {"devices": devices, "default_link": {"latency_ms": 2, "bandwidth_mb_s": 50}}
    (tmp_path / "cluster.json").write_text(json.dumps(cluster))
    done = _run(
        _train_argv(
            "--model",
            "config.json",
            "--cluster",
            "cluster.json",
            "--dry-run",
            "--micro-batches",
            "6",
        ),  # fmt: skip
        tmp_path,
        timeout_s=120,
    )
    for schedule in ("gpipe", "1f1b", "random-skip", "skippipe"):
        assert schedule in done.stdout, f"{schedule} missing from the dry run:\n{done.stdout}"
    assert "Stages" in done.stdout and "d0" in done.stdout


def _training_view(http_port: int) -> dict[str, Any] | None:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/training", timeout=2) as r:
            return json.loads(r.read())
    except OSError:
        return None


def _kill_mid_run(
    procs: ProcessPool,  # noqa: F811
    tmp_path: Path,
    agents: tuple[str, ...],
    after_steps: int,
    pick_victim: Callable[[dict[str, Any]], str],
    *train_args: str,
) -> tuple[str, list[dict[str, Any]]]:
    """Trains a byte-level model on `agents` (real processes), kills the agent that
    `pick_victim(plan)` names once `after_steps` steps are logged, waits for the run to
    finish; returns the victim and the JSON log."""
    (tmp_path / "config.json").write_text(json.dumps(BYTE_CONFIG))
    argv = _train_argv(
        "--model", "config.json", "--data", str(GENESIS), "--min-agents", str(len(agents)),
        "--schedule", "gpipe", "--eval-every", "0", "--lr", "3e-3", "--log-json", "log.jsonl",
        "--checkpoint-dir", "ck", *train_args,
    )  # fmt: skip
    http_port, grpc_port = (int(argv[argv.index(flag) + 1]) for flag in ("--port", "--grpc-port"))
    coordinator = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        started = {n: procs.agent(f"127.0.0.1:{grpc_port}", token="t", name=n) for n in agents}
        log = tmp_path / "log.jsonl"
        wait_until(
            lambda: log.exists() and len(_steps(_log(log))) >= after_steps, 120,
            f"{after_steps} training steps",
        )  # fmt: skip
        view = _training_view(http_port)
        assert view is not None and view["plan"] is not None, view
        assert view["state"] != "done" and view["step"] < view["steps"], view  # still going
        victim = pick_victim(view["plan"])
        os.killpg(started[victim].pid, signal.SIGKILL)
        out, _ = coordinator.communicate(timeout=180)
        assert coordinator.returncode == 0, out.decode()[-3000:]
    finally:
        if coordinator.poll() is None:
            os.killpg(coordinator.pid, signal.SIGKILL)
    return victim, _log(tmp_path / "log.jsonl")


def _a_replica(plan: dict[str, Any]) -> str:
    replicated = [s for s in plan["stages"] if len(s["agents"]) > 1]
    assert replicated, f"the plan has no replicated stage: {plan['stages']}"
    return str(replicated[0]["agents"][-1])


def _last_stage_holder(plan: dict[str, Any]) -> str:
    return str(plan["stages"][-1]["agents"][0])


def test_killing_a_replica_loses_no_step(procs: ProcessPool, tmp_path: Path) -> None:  # noqa: F811
    victim, records = _kill_mid_run(
        procs, tmp_path, ("ka", "kb", "kc"), 3, _a_replica,
        "--stages", "2", "--micro-batches", "4", "--seq-len", "64", "--steps", "40",
    )  # fmt: skip
    steps = [r["step"] for r in _steps(records)]
    assert steps == list(range(1, 41)), f"steps applied twice or lost: {steps}"
    notes = [r["message"] for r in records if r.get("event") == "note"]
    assert any("re-planning" in n and victim in n for n in notes), notes
    losses = [r["loss"] for r in _steps(records)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, f"the loss did not fall: {losses}"
    _serves(tmp_path / "ck" / "final", tmp_path)  # the checkpoint serves (prompts as bytes)


def test_fine_tuning_smollm2_lowers_held_out_loss(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    from edgecluster.weights.models import resolve_model

    try:
        resolve_model("smollm2-135m")  # converted once, shared with the serving tests
    except ValueError as exc:
        pytest.skip(str(exc))
    _run(
        _train_argv("--model", "smollm2-135m", "--data", str(GENESIS), "--local", "1",
                    "--schedule", "gpipe", "--stages", "2", "--micro-batches", "2",
                    "--seq-len", "32", "--lr", "2e-4", "--steps", "2", "--eval-every", "2",
                    "--eval-batches", "1", "--checkpoint-dir", "ck", "--log-json", "log.jsonl"),
        tmp_path,
        timeout_s=400,
    )  # fmt: skip
    records = _log(tmp_path / "log.jsonl")
    evals = [r["eval_loss"] for r in records if r.get("eval_loss") is not None]
    assert len(evals) >= 2 and evals[-1] < evals[0], f"held-out loss did not fall: {evals}"
    final = tmp_path / "ck" / "final"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.config.num_hidden_layers == 30
    assert (final / "tokenizer.json").is_file(), "the tokenizer travels with the checkpoint"


def _serves(model_dir: Path, tmp_path: Path) -> None:
    import urllib.request

    http, grpc = free_ports(2)
    argv = [sys.executable, "-m", "coordinator.cli", "serve", "--model", str(model_dir),
            "--local", "1", "--no-mdns", "--token", "t", "--port", str(http),
            "--grpc-port", str(grpc), "--max-context", "256"]  # fmt: skip
    server = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/health", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_until(ready, 240, "the fine-tuned model to be served")
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/v1/models", timeout=5) as r:
            name = json.loads(r.read())["data"][0]["id"]
        prompt = list(b"In the beginning God created")  # a byte-level model: ids are bytes
        body = json.dumps({"model": name, "prompt": prompt, "max_tokens": 8,
                           "temperature": 0}).encode()  # fmt: skip
        request = urllib.request.Request(f"http://127.0.0.1:{http}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=60) as r:
            answer = json.loads(r.read())
        assert answer["usage"]["completion_tokens"] == 8, answer
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def test_losing_a_stage_everywhere_rolls_back_to_the_checkpoint(
    procs: ProcessPool,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Three agents, three stages, one agent each: when the only holder of a layer stage
    dies, its layers survive nowhere, so training goes on from the last checkpoint."""
    _, records = _kill_mid_run(
        procs, tmp_path, ("ra", "rb", "rc"), 6, _last_stage_holder,
        "--stages", "3", "--micro-batches", "2", "--seq-len", "32", "--steps", "40",
        "--checkpoint-every", "4",
    )  # fmt: skip
    notes = [r["message"] for r in records if r.get("event") == "note"]
    rolled = [
        re.search(r"rolled back from step (\d+) to checkpoint .* \(step (\d+)\)", n) for n in notes
    ]
    found = [m for m in rolled if m]
    assert found, f"no roll-back note: {notes}"
    lost_at, checkpoint = int(found[0].group(1)), int(found[0].group(2))
    assert checkpoint % 4 == 0 and 4 <= checkpoint <= lost_at, (lost_at, checkpoint)
    steps = [r["step"] for r in _steps(records)]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert steps[:restart] == list(range(1, restart + 1)), steps
    assert steps[restart:] == list(range(checkpoint + 1, 41)), (
        f"training did not go on from the checkpoint at step {checkpoint}: {steps}"
    )
    assert (tmp_path / "ck" / "final" / "model.safetensors").is_file()
