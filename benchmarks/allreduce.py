"""All-reduce latency: our star and ring against torch.distributed gloo and raw TCP.

    python benchmarks/allreduce.py [--quick] [--json]

For 2, 3 and 4 nodes (one process per rank, all on 127.0.0.1) and payloads of
2304 B (fp32, one decode step of a 576-wide model), 32 KiB and 1 MiB: latency of
our star and ring all-reduce and of gloo's `all_reduce` in the same processes; the
raw TCP round trip of each payload between two processes (Python sockets,
TCP_NODELAY, echo); and star against ring at injected link delays of 1 and 5 ms.
`direct` (every rank sends to every rank and adds itself: one hop; what serving
uses for a decode step's payloads) at 2304 B and 32 KiB, with and without delay.

How a repetition is timed: every rank passes a barrier (a one-element star
all-reduce on a separate session), stamps CLOCK_MONOTONIC, runs the operation and
stamps again. One repetition's latency is the last rank's end minus the last rank's
start: from the moment every rank has entered until every rank holds the sum, which
takes the barrier's exit skew out and treats every algorithm alike. The OSU-style
mean over ranks of each rank's own elapsed time is reported next to it
(`rank_avg_median_us`). Warm-up repetitions are dropped.

Bar (issue 2): star, 4 nodes, 2304 B, no delay: median <= 300 us and >= 5x faster
than gloo in the same run. The table comes first; the last line is one JSON object.

Frame protection (issue 10): every data-channel frame carries a tag. The star rows
are the default, MAC-only (clusters without TLS); `star-aead` seals payloads too
(clusters with TLS) and `star-plain` drops the tags through a private hook (the
figure before issue 10), all at 2304 B. The JSON's `auth_modes` holds the three
4-node medians (us).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import secrets
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # nothing leaves loopback
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from common import format_table, machine_info, print_json_last, spread  # noqa: E402

from edgecluster.comm.communicator import Communicator, SessionConfig  # noqa: E402
from edgecluster.net.datachannel import DataListener  # noqa: E402

NODE_COUNTS = (2, 3, 4)
PAYLOAD_BYTES = (2304, 32 << 10, 1 << 20)
DELAYS_MS = (1.0, 5.0)
BAR_US, BAR_SPEEDUP = 300.0, 5.0
SESSIONS = [("ctrl", "star", 0.0)] + [
    (f"{algo}@{d:g}", algo, d) for d in (0.0, *DELAYS_MS) for algo in ("star", "ring", "direct")
]
SESSIONS += [(f"star-{mode}@0", "star", 0.0) for mode in ("plain", "aead")]
AUTH_MODES = {"plain": "star-plain", "mac": "star", "aead": "star-aead"}


@dataclass(frozen=True, kw_only=True)
class Reps:
    """Warm-up and timed repetitions per payload size (bytes -> count)."""

    warmup: int
    timed: dict[int, int]
    delayed: int  # timed repetitions at an injected delay

    def count(self, payload: int, delay_ms: float) -> int:
        return self.delayed if delay_ms else self.timed[payload]


QUICK = Reps(warmup=10, timed={2304: 150, 32 << 10: 60, 1 << 20: 15}, delayed=6)
FULL = Reps(warmup=30, timed={2304: 1500, 32 << 10: 500, 1 << 20: 80}, delayed=30)


# ------------------------------------------------------------------ rank process


class RankProcess:
    """One rank: a data listener, kept sessions, a gloo group, a TCP echo socket."""

    def __init__(self, rank: int, world: int) -> None:
        torch.set_num_threads(1)
        self.rank, self.world = rank, world
        self.listener = DataListener("127.0.0.1")
        self.echo = socket.create_server(("127.0.0.1", 0))
        self.comms: dict[str, Communicator] = {}

    def expect(self, spec: dict[str, Any]) -> None:
        for name, _, delay_ms in SESSIONS:
            encrypt = name.startswith("star-aead")
            self.listener.expect(f"{spec['prefix']}{name}", spec["key"], delay_ms, encrypt)

    def connect(self, spec: dict[str, Any]) -> None:
        for name, algo, delay_ms in SESSIONS:
            config = SessionConfig(
                session_id=f"{spec['prefix']}{name}",
                session_key=spec["key"],
                rank=self.rank,
                endpoints=tuple(spec["endpoints"]),
                algorithm=algo,
                link_delay_ms=delay_ms,
                encrypt=name.startswith("star-aead"),
            )
            self.comms[name] = Communicator.connect(config, self.listener)
            if name.startswith("star-plain"):
                _drop_frame_tags(self.comms[name])

    def init_gloo(self, spec: dict[str, Any]) -> None:
        store = dist.TCPStore("127.0.0.1", spec["store_port"], is_master=False)
        dist.init_process_group("gloo", store=store, rank=self.rank, world_size=self.world)

    def operation(self, algo: str, payload: int, delay_ms: float) -> Callable[[], Any]:
        x = torch.randn(payload // 4, generator=torch.Generator().manual_seed(self.rank))
        if algo == "gloo":
            zeros = torch.zeros_like(x)  # in place, and stays zero
            return lambda: dist.all_reduce(zeros)
        comm = self.comms[f"{algo}@{delay_ms:g}"]
        return lambda: comm.all_reduce(x)

    def measure(self, spec: dict[str, Any]) -> list[tuple[int, int]]:
        """(start_ns, end_ns) of each timed repetition, barrier before each."""
        op = self.operation(spec["algo"], spec["bytes"], spec["delay_ms"])
        barrier_input = torch.zeros(1)
        stamps: list[tuple[int, int]] = []
        for i in range(spec["warmup"] + spec["reps"]):
            self.comms["ctrl"].all_reduce(barrier_input)
            start = time.monotonic_ns()
            op()
            end = time.monotonic_ns()
            if i >= spec["warmup"]:
                stamps.append((start, end))
        return stamps

    def tcp_rtt(self, spec: dict[str, Any]) -> list[int]:
        """Rank 1 echoes; rank 0 times each round trip of a `bytes`-sized payload."""
        size, count = spec["bytes"], spec["warmup"] + spec["reps"]
        if self.rank == 1:
            conn, _ = self.echo.accept()
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                buf = bytearray(size)
                for _ in range(count):
                    _recv_exactly(conn, buf)
                    conn.sendall(buf)
            return []
        with socket.create_connection(("127.0.0.1", spec["echo_port"])) as conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            payload, buf, times = os.urandom(size), bytearray(size), []
            for _ in range(count):
                start = time.monotonic_ns()
                conn.sendall(payload)
                _recv_exactly(conn, buf)
                times.append(time.monotonic_ns() - start)
        return times[spec["warmup"] :]

    def close(self) -> None:
        for comm in self.comms.values():
            comm.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        self.listener.close()


def _drop_frame_tags(comm: Communicator) -> None:
    """Private hook: frames of this session go untagged, as before issue 10 (every rank
    does it, right after the handshake, so both ends of each link agree)."""
    for rank in range(comm.world_size):
        if rank != comm.rank:
            comm.link(rank)._seal = None


def _recv_exactly(conn: socket.socket, buf: bytearray) -> None:
    view, got = memoryview(buf), 0
    while got < len(buf):
        n = conn.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("echo peer closed")
        got += n


def rank_main(rank: int, world: int, inbox: Any, outbox: Any) -> None:
    """A rank process: answers each command from the parent until None."""
    proc = RankProcess(rank, world)
    outbox.put((proc.listener.port, proc.echo.getsockname()[1]))
    handlers = {
        "expect": proc.expect,
        "connect": proc.connect,
        "gloo": proc.init_gloo,
        "measure": proc.measure,
        "tcp_rtt": proc.tcp_rtt,
    }
    while (cmd := inbox.get()) is not None:
        outbox.put(handlers[cmd["op"]](cmd))
    proc.close()


# ------------------------------------------------------------------ parent


class Cluster:
    """`world` rank processes on loopback, with all sessions and gloo set up."""

    def __init__(self, world: int, timeout_s: float = 120.0) -> None:
        ctx = mp.get_context("spawn")
        self.world, self.timeout_s = world, timeout_s
        self.inboxes = [ctx.Queue() for _ in range(world)]
        self.outboxes = [ctx.Queue() for _ in range(world)]
        self.procs = [
            ctx.Process(target=rank_main, args=(r, world, self.inboxes[r], self.outboxes[r]))
            for r in range(world)
        ]
        for proc in self.procs:
            proc.daemon = True
            proc.start()
        ports = [box.get(timeout=timeout_s) for box in self.outboxes]
        self.echo_ports = [echo for _, echo in ports]
        spec = {
            "prefix": f"bench-{secrets.token_hex(4)}-",
            "key": secrets.token_bytes(32),
            "endpoints": [f"127.0.0.1:{data}" for data, _ in ports],
        }
        self.call({**spec, "op": "expect"})
        self.call({**spec, "op": "connect"})
        self.store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        self.call({"op": "gloo", "store_port": self.store.port})

    def call(self, cmd: dict[str, Any], ranks: Sequence[int] | None = None) -> list[Any]:
        ranks = range(self.world) if ranks is None else ranks
        for r in ranks:
            self.inboxes[r].put(cmd)
        return [self.outboxes[r].get(timeout=self.timeout_s) for r in ranks]

    def close(self) -> None:
        for box in self.inboxes:
            box.put(None)
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()


def summarize(stamps: list[list[tuple[int, int]]]) -> dict[str, float]:
    """Per repetition: last end - last start (us); plus the OSU-style mean over ranks."""
    latency, rank_avg = [], []
    for rep in zip(*stamps, strict=True):
        latency.append((max(e for _, e in rep) - max(s for s, _ in rep)) / 1e3)
        rank_avg.append(statistics.fmean(e - s for s, e in rep) / 1e3)
    return {**spread(latency), "rank_avg_median_us": round(statistics.median(rank_avg), 1)}


def measure_cluster(cluster: Cluster, reps: Reps, progress: bool) -> list[dict[str, Any]]:
    rows = []
    cases = [(a, b, 0.0) for b in PAYLOAD_BYTES for a in ("star", "ring", "gloo")]
    cases += [(a, 2304, 0.0) for a in ("star-plain", "star-aead")]
    cases += [(a, b, d) for d in DELAYS_MS for b in PAYLOAD_BYTES for a in ("star", "ring")]
    cases += [("direct", b, d) for d in (0.0, *DELAYS_MS) for b in PAYLOAD_BYTES[:2]]
    for algo, payload, delay_ms in cases:
        count = reps.count(payload, delay_ms)
        warmup = min(reps.warmup, max(2, count // 5)) if delay_ms else reps.warmup
        cmd = {"op": "measure", "algo": algo, "bytes": payload, "delay_ms": delay_ms}
        stamps = cluster.call({**cmd, "warmup": warmup, "reps": count})
        row = {"algo": algo, "nodes": cluster.world, "bytes": payload, "link_delay_ms": delay_ms}
        row |= summarize(stamps) | {"reps": count}
        if delay_ms:
            hops = {"star": 2, "direct": 1}.get(algo, 2 * (cluster.world - 1))
            row["model_floor_us"] = hops * delay_ms * 1e3
        rows.append(row)
        if progress:
            print(
                f"  {algo:4} {cluster.world}n {payload:>8} B delay {delay_ms:g} ms: "
                f"{row['median_us']:9.1f} us",
                file=sys.stderr,
                flush=True,
            )
    return rows


def measure_tcp_rtt(cluster: Cluster, reps: Reps) -> list[dict[str, Any]]:
    rows = []
    for payload in PAYLOAD_BYTES:
        cmd = {"op": "tcp_rtt", "bytes": payload, "echo_port": cluster.echo_ports[1]}
        times = cluster.call({**cmd, "warmup": reps.warmup, "reps": reps.timed[payload]}, [1, 0])
        rows.append({"bytes": payload, **spread([t / 1e3 for t in times[1]])})
    return rows


def bar(rows: list[dict[str, Any]], tcp: list[dict[str, Any]]) -> dict[str, Any]:
    def median(algo: str) -> float:
        (row,) = [
            r
            for r in rows
            if (r["algo"], r["nodes"], r["bytes"], r["link_delay_ms"]) == (algo, 4, 2304, 0.0)
        ]
        return float(row["median_us"])

    star, gloo = median("star"), median("gloo")
    rtt = next(t["median_us"] for t in tcp if t["bytes"] == 2304)
    return {
        "star_4n_2304B_median_us": star,
        "gloo_4n_2304B_median_us": gloo,
        "speedup_vs_gloo": round(gloo / star, 2),
        "star_over_tcp_rtt": round(star / rtt, 2),
        "meets_bar": star <= BAR_US and gloo / star >= BAR_SPEEDUP,
        "auth_modes": {mode: median(algo) for mode, algo in AUTH_MODES.items()},
    }


def run_benchmark(reps: Reps, progress: bool = True) -> dict[str, Any]:
    machine = machine_info()
    rows: list[dict[str, Any]] = []
    tcp: list[dict[str, Any]] = []
    for world in NODE_COUNTS:
        cluster = Cluster(world)
        try:
            rows += measure_cluster(cluster, reps, progress)
            if world == 2:
                tcp = measure_tcp_rtt(cluster, reps)
        finally:
            cluster.close()
    machine["load_avg_1m_end"] = os.getloadavg()[0]  # other work on the machine skews all
    return {
        "results": rows,
        "tcp_rtt_us": next(t["median_us"] for t in tcp if t["bytes"] == 2304),
        "tcp_rtt": tcp,
        "bar": bar(rows, tcp),
        "auth_modes": bar(rows, tcp)["auth_modes"],
        "machine": machine,
    }


def report(result: dict[str, Any]) -> str:
    columns = ["algo", "nodes", "bytes", "link_delay_ms", "median_us", "p10_us", "p90_us"]
    columns += ["rank_avg_median_us", "model_floor_us", "reps"]
    tcp_cols = ["bytes", "median_us", "p10_us", "p90_us"]
    b = result["bar"]
    return "\n".join(
        [
            format_table(result["results"], columns),
            "",
            "raw TCP round trip (2 processes, Python sockets, TCP_NODELAY, echo):",
            format_table(result["tcp_rtt"], tcp_cols),
            "",
            f"bar: star 4n 2304 B {b['star_4n_2304B_median_us']:.1f} us (<= {BAR_US:g}), "
            f"gloo {b['gloo_4n_2304B_median_us']:.1f} us, speedup {b['speedup_vs_gloo']:.1f}x "
            f"(>= {BAR_SPEEDUP:g}), star / TCP RTT {b['star_over_tcp_rtt']:.1f}x: "
            f"{'MEETS' if b['meets_bar'] else 'MISSES'} the bar",
            "frame protection, star 4n 2304 B median: "
            + ", ".join(f"{m} {us:.1f} us" for m, us in b["auth_modes"].items()),
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (< 1 min)")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    result = run_benchmark(QUICK if args.quick else FULL, progress=not args.json)
    result["mode"] = "quick" if args.quick else "full"
    if not args.json:
        print(report(result))
    print_json_last(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
