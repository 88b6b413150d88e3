"""`edge-coordinator serve | status`: run a cluster's coordinator, or look at one."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from edgecluster.config import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT, CoordinatorConfig, cache_root
from edgecluster.log import configure_logging
from edgecluster.net.grpc_util import TlsFiles
from edgecluster.units import format_bytes, parse_size


def _tls_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", type=Path, help="serve gRPC over TLS with this certificate")
    p.add_argument("--tls-key", type=Path)
    p.add_argument("--tls-ca", type=Path, help="CA to verify peers' certificates")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-coordinator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the coordinator (and serve a model)")
    serve.add_argument(
        "--model", default="none", help="none | smollm2-135m | checkpoint dir | .gguf"
    )
    serve.add_argument("--local", type=int, default=0, help="start N local agents as children")
    serve.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: all)")
    serve.add_argument("--port", type=int, default=DEFAULT_HTTP_PORT, help="HTTP API port")
    serve.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT)
    serve.add_argument("--data-port", type=int, default=0, help="data-channel port (default: any)")
    serve.add_argument("--token", default=os.environ.get("EDGE_TOKEN"), help="cluster token")
    serve.add_argument("--peers", default="", help="agents to invite, host:port,...")
    serve.add_argument("--no-mdns", action="store_true")
    serve.add_argument("--min-agents", type=int, help="agents to wait for (default: --local or 1)")
    serve.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    serve.add_argument(
        "--storage-dtype", choices=["float32", "bfloat16"], help="shard bytes on disk"
    )
    serve.add_argument("--max-context", type=int, default=2048)
    serve.add_argument(
        "--kv-dtype", choices=["float32", "bfloat16"], help="KV cache dtype (default: --dtype)"
    )
    serve.add_argument(
        "--kv-budget",
        type=int,
        default=0,
        metavar="TOKENS",
        help="KV positions all requests in flight may hold at once (default: 2 x "
        "--max-context, halved down to 256 until the tightest agent has room)",
    )
    serve.add_argument("--memory-limit", help="memory this coordinator may use, e.g. 1GiB")
    serve.add_argument("--link-delay-ms", type=float, help="inject per-link delay (experiments)")
    serve.add_argument("--log-level", default="INFO")
    _tls_args(serve)
    status = sub.add_parser("status", help="list the cluster's agents")
    status.add_argument("--coordinator", default=f"127.0.0.1:{DEFAULT_GRPC_PORT}")
    status.add_argument("--token", default=os.environ.get("EDGE_TOKEN"))
    status.add_argument("--json", action="store_true")
    _tls_args(status)
    return parser


def _serve_config(args: argparse.Namespace, token: str) -> CoordinatorConfig:
    from edgecluster.net.datachannel import default_link_delay_ms

    delay = args.link_delay_ms if args.link_delay_ms is not None else default_link_delay_ms()
    return CoordinatorConfig(
        token=token,
        model=args.model,
        host=args.host,
        http_port=args.port,
        grpc_port=args.grpc_port,
        data_port=args.data_port,
        peers=tuple(p.strip() for p in args.peers.split(",") if p.strip()),
        mdns=not args.no_mdns,
        local_agents=args.local,
        min_agents=args.min_agents or max(1, args.local),
        dtype=args.dtype,
        storage_dtype=args.storage_dtype,
        max_context=args.max_context,
        kv_dtype=args.kv_dtype,
        kv_budget_tokens=args.kv_budget,
        memory_limit_bytes=parse_size(args.memory_limit) if args.memory_limit else 0,
        link_delay_ms=delay,
        tls=TlsFiles(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca),
        cache_dir=cache_root(),
    )


def _announce(node: Any, token: str, generated: bool) -> None:
    cfg = node.config
    where = f"gRPC {cfg.host}:{node.grpc_port}, HTTP {cfg.host}:{cfg.http_port}"
    lines = [f"edgecluster coordinator: {where}"]
    if generated:
        lines.append(f"generated cluster token: {token}")
    lines.append(f"join a device:  edge-agent join {node.grpc_address} --token {token}")
    if cfg.host == "127.0.0.1":
        lines.append("(serving on loopback only; use --host 0.0.0.0 for devices on your LAN)")
    print("\n".join(lines), flush=True)
    if node.serving is not None:
        threading.Thread(target=_print_when_ready, args=(node,), daemon=True).start()


def _print_when_ready(node: Any) -> None:
    while not node.serving.wait_ready(1.0):
        pass
    host = "127.0.0.1" if node.config.host == "0.0.0.0" else node.config.host
    body = json.dumps(
        {
            "model": node.config.model,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 32,
            "temperature": 0,
        }
    )
    print(
        f"\nready: {node.config.model} on {len(node.membership.alive())} agents. Try:\n"
        f"curl http://{host}:{node.config.http_port}/v1/chat/completions "
        f"-H 'Content-Type: application/json' -d '{body}'\n",
        flush=True,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from edgecluster.net.auth import generate_token
    from edgecluster.runtime.coordinator import run_coordinator

    token, generated = args.token, False
    if not token:
        token, generated = generate_token(), True
    try:
        config = _serve_config(args, token)
    except ValueError as exc:
        print(f"edge-coordinator: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return run_coordinator(config, stop, on_ready=lambda n: _announce(n, token, generated))


def cmd_status(args: argparse.Namespace) -> int:
    import grpc

    from edgecluster.net.convert import member_from_pb
    from edgecluster.net.grpc_util import open_channel
    from edgecluster.net.pb import edgecluster_pb2 as pb
    from edgecluster.net.pb import edgecluster_pb2_grpc as pb_grpc

    if not args.token:
        print("edge-coordinator: pass --token or set EDGE_TOKEN", file=sys.stderr)
        return 2
    tls = TlsFiles(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca)
    channel = open_channel(args.coordinator, args.token, tls)
    try:
        reply = pb_grpc.CoordinatorStub(channel).ListMembers(pb.Empty(), timeout=5)
    except grpc.RpcError as exc:
        print(
            f"edge-coordinator: {args.coordinator}: {exc.code().name}: {exc.details()}",
            file=sys.stderr,
        )
        return 1
    members = [member_from_pb(m).to_json() for m in reply.agents]
    if args.json:
        print(json.dumps({"agents": members}, indent=2))
    else:
        print(_table(members))
    return 0


def _table(members: list[dict[str, Any]]) -> str:
    header = (
        f"{'NAME':<16} {'STATE':<6} {'ADDRESS':<22} {'CPUS':>4} {'MEMORY':>10} "
        f"{'AVAIL':>10} {'DISK/s':>10} {'GFLOPS':>7}"
    )
    rows = [header]
    for m in members:
        rows.append(
            f"{m['name']:<16} {m['state']:<6} {m['address']:<22} {m['cpu_count']:>4} "
            f"{format_bytes(m['memory_total_bytes']):>10} "
            f"{format_bytes(m['memory_available_bytes']):>10} "
            f"{format_bytes(m['disk_read_bytes_per_s']):>10} {m['matmul_gflops']:>7.1f}"
        )
    if not members:
        rows.append("(no agents yet: start `edge-agent join` on a device)")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        configure_logging("coordinator", args.log_level)
        return cmd_serve(args)
    configure_logging("status", "WARNING")
    return cmd_status(args)


if __name__ == "__main__":
    sys.exit(main())
