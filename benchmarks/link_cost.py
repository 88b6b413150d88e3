"""The data channel's Python cost per message: one tensor sent and received on a Link.

    python benchmarks/link_cost.py [--quick] [--compare TREE ...]

A decode step sends and receives a [1, 576] fp32 tensor (2304 B) per block on every
agent, sixty blocks a token, so what one message costs in Python (header, tag,
tensor allocation, reads) adds up. One process, one thread, two Links on a loopback
TCP pair: a repetition is `send_tensor` on one end and `recv_tensor` on the other,
in CPU time of the thread (so that being descheduled on a loaded machine does not
count), per batch of messages, send and receive apart, for each frame protection
mode (`plain`: no tags, `mac`: the default, `aead`: sealed). The peer in the same
run is the floor: the same bytes (header, payload and tag) through `sendall` and
`recv_into` on the same kind of socket pair, with no framing at all.

With `--compare TREE` (another checkout's root, e.g. the main branch) every
round measures each tree in a fresh process, interleaved (this tree, TREE, this
tree, ...), so a loaded machine weighs on both alike: that is the before/after.
Figures are the minimum and the median over batches of the mean CPU us per message.
Table first; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import format_table, machine_info, print_json_last

SHAPE = (1, 576)
MODES = ("plain", "mac", "aead")
HERE = Path(__file__).resolve().parent.parent


def _socket_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    for sock in (a, b):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return a, b


def _link_pair(mode: str) -> tuple[Any, Any]:
    from edgecluster.net.datachannel import Link
    from edgecluster.net.frame_seal import AEAD, MAC, TO_CLIENT, TO_SERVER, FrameSeal

    a, b = _socket_pair()
    sender, receiver = Link(a, "receiver", spin_us=0), Link(b, "sender", spin_us=0)
    if mode != "plain":
        key, kind = secrets.token_bytes(32), MAC if mode == "mac" else AEAD
        sender.protect(FrameSeal(key, mode=kind, outgoing=TO_SERVER, incoming=TO_CLIENT))
        receiver.protect(FrameSeal(key, mode=kind, outgoing=TO_CLIENT, incoming=TO_SERVER))
    return sender, receiver


def _time_links(mode: str, batches: int, per_batch: int) -> dict[str, list[float]]:
    import torch

    sender, receiver = _link_pair(mode)
    x = torch.randn(SHAPE)
    send_us, recv_us = [], []
    clock = time.thread_time_ns  # CPU time of this thread: robust to a loaded machine
    for _ in range(batches):
        sent = received = 0
        for _ in range(per_batch):
            t0 = clock()
            sender.send_tensor(x)
            t1 = clock()
            got = receiver.recv_tensor()
            t2 = clock()
            sent += t1 - t0
            received += t2 - t1
        send_us.append(sent / per_batch / 1e3)
        recv_us.append(received / per_batch / 1e3)
    assert torch.equal(got, x), "the tensor came back changed"
    sender.close()
    receiver.close()
    return {"send": send_us, "recv": recv_us}


def _time_raw_socket(batches: int, per_batch: int) -> dict[str, list[float]]:
    """sendall + recv_into of a frame's bytes (27 B header, 2304 B, 16 B tag)."""
    a, b = _socket_pair()
    data = secrets.token_bytes(4 + 1 + 26 + 2304 + 16)
    into = memoryview(bytearray(len(data)))
    send_us, recv_us = [], []
    clock = time.thread_time_ns  # CPU time of this thread: robust to a loaded machine
    for _ in range(batches):
        sent = received = 0
        for _ in range(per_batch):
            t0 = clock()
            a.sendall(data)
            t1 = clock()
            got = 0
            while got < len(into):
                got += b.recv_into(into[got:])
            t2 = clock()
            sent += t1 - t0
            received += t2 - t1
        send_us.append(sent / per_batch / 1e3)
        recv_us.append(received / per_batch / 1e3)
    a.close()
    b.close()
    return {"send": send_us, "recv": recv_us}


def run_worker(batches: int, per_batch: int) -> dict[str, Any]:
    """Every mode's per-message figures in this process (the tree on sys.path)."""
    import torch

    torch.set_num_threads(1)
    timings = {"raw": _time_raw_socket(batches, per_batch)}
    for mode in MODES:
        _time_links(mode, 2, per_batch)  # warm-up
        timings[mode] = _time_links(mode, batches, per_batch)
    return timings


def _measure(tree: Path, batches: int, per_batch: int) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    argv = [sys.executable, __file__, "--worker", f"--batches={batches}"]
    out = subprocess.run(
        [*argv, f"--per-batch={per_batch}"], env=env, capture_output=True, text=True, check=True
    )
    return dict(json.loads(out.stdout.splitlines()[-1]))


def _summary(runs: list[dict[str, Any]], mode: str) -> dict[str, float]:
    pairs = [s + r for run in runs for s, r in zip(*run[mode].values(), strict=True)]
    sends = [s for run in runs for s in run[mode]["send"]]
    recvs = [r for run in runs for r in run[mode]["recv"]]
    return {
        "pair_min_us": round(min(pairs), 1),
        "pair_median_us": round(statistics.median(pairs), 1),
        "send_median_us": round(statistics.median(sends), 1),
        "recv_median_us": round(statistics.median(recvs), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and messages")
    parser.add_argument("--compare", nargs="*", type=Path, default=[], metavar="TREE")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batches", type=int, default=100, help=argparse.SUPPRESS)
    parser.add_argument("--per-batch", type=int, default=50, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args.batches, args.per_batch)))
        return 0
    rounds, batches = (3, 40) if args.quick else (8, 100)
    trees = {"this": HERE, **{str(tree): tree.resolve() for tree in args.compare}}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    for round_ in range(rounds):
        for name, tree in trees.items():
            runs[name].append(_measure(tree, batches, 50))
        print(f"round {round_ + 1}/{rounds} done", file=sys.stderr)
    results = {
        name: {mode: _summary(tree_runs, mode) for mode in ("raw", *MODES)}
        for name, tree_runs in runs.items()
    }
    rows = [
        {"tree": name, "mode": mode, **figures[mode]}
        for name, figures in results.items()
        for mode in ("raw", *MODES)
    ]
    columns = ["tree", "mode", "pair_min_us", "pair_median_us", "send_median_us", "recv_median_us"]
    print(format_table(rows, columns))
    mac = results["this"]["mac"]["pair_median_us"]
    result: dict[str, Any] = {
        "shape": list(SHAPE),
        "mac_pair_median_us": mac,
        "mac_over_raw": round(mac / results["this"]["raw"]["pair_median_us"], 2),
        "trees": {name: str(tree) for name, tree in trees.items()},
        "results": results,
        "machine": machine_info(),
    }
    print_json_last(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
