"""How fast a new agent is listed: from its process start to GET /v1/cluster showing it.

An agent joins before it imports torch (light profile: cores, memory, disk space)
and sends its measured profile afterwards. This measures, per run, the seconds from
Popen of `edge-agent join` to (a) its being listed alive and (b) its measured profile
(matmul GFLOPS) being listed, against a real coordinator on loopback; next to them,
the cost the early join avoids: `python -c "import torch"` in a fresh process.

    python benchmarks/join_time.py [--runs 5] [--quick]

Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from common import format_table, free_tcp_port, machine_info, print_json_last, spread

TOKEN = "join-time-bench"


def _cluster(url: str) -> list[dict[str, Any]]:
    try:
        with urllib.request.urlopen(url + "/v1/cluster", timeout=2) as resp:
            return list(json.loads(resp.read())["agents"])
    except OSError:
        return []


def _wait(predicate: Any, timeout_s: float, what: str) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(0.01)
    raise RuntimeError(f"timed out after {timeout_s} s waiting for {what}")


def _start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=out, env=env, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def one_join(url: str, grpc: str, root: Path, index: int) -> tuple[float, float]:
    """(seconds to listed, seconds to measured profile) of one fresh agent."""
    name = f"bench-{index}"
    argv = [
        sys.executable, "-m", "agents.cli", "join", grpc, "--token", TOKEN, "--name", name,
        "--no-mdns", "--threads", "1", "--data-dir", str(root / name),
    ]  # fmt: skip
    started = time.monotonic()
    proc = _start(argv, root / f"{name}.log")
    try:

        def listed(measured: bool) -> bool:
            for a in _cluster(url):
                if a["name"] == name and a["state"] == "alive":
                    return not measured or a["matmul_gflops"] > 0
            return False

        at_listed = _wait(lambda: listed(False), 120, f"{name} to be listed")
        at_measured = _wait(lambda: listed(True), 120, f"{name}'s measured profile")
    finally:
        _stop(proc)
    return at_listed - started, at_measured - started


def import_torch_s() -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="3 runs")
    args = parser.parse_args(argv)
    runs = 3 if args.quick else args.runs
    root = Path(tempfile.mkdtemp(prefix="join-time-"))
    http, grpc_port = free_tcp_port(), free_tcp_port()
    coord = _start(
        [
            sys.executable, "-m", "coordinator.cli", "serve", "--model", "none", "--no-mdns",
            "--token", TOKEN, "--port", str(http), "--grpc-port", str(grpc_port),
        ],
        root / "coordinator.log",
    )  # fmt: skip
    url, grpc = f"http://127.0.0.1:{http}", f"127.0.0.1:{grpc_port}"
    try:
        _wait(lambda: _cluster(url) == [] and coord.poll() is None, 60, "the coordinator")
        rows = []
        for i in range(runs):
            listed_s, measured_s = one_join(url, grpc, root, i)
            rows.append({"run": i, "listed_s": listed_s, "measured_s": measured_s})
            print(format_table([rows[-1]], ["run", "listed_s", "measured_s"]), flush=True)
        torch_s = [import_torch_s() for _ in range(runs)]
    finally:
        _stop(coord)
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "benchmark": "join_time",
        "runs": runs,
        "listed": spread([r["listed_s"] for r in rows], unit="s", digits=3),
        "measured_profile": spread([r["measured_s"] for r in rows], unit="s", digits=3),
        "import_torch": spread(torch_s, unit="s", digits=3),
        "machine": machine_info(),
    }
    print(
        f"listed after {result['listed']['median_s']} s (median), measured profile after "
        f"{result['measured_profile']['median_s']} s; `import torch` alone takes "
        f"{result['import_torch']['median_s']} s"
    )
    print_json_last(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
