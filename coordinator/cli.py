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

from edgecluster.config import (
    DEFAULT_GRPC_PORT,
    DEFAULT_HTTP_PORT,
    DEFAULT_MAX_QUEUE,
    DEFAULT_REQUEST_TIMEOUT_S,
    CoordinatorConfig,
    cache_root,
    is_loopback_host,
)
from edgecluster.log import configure_logging
from edgecluster.net.grpc_util import TlsFiles
from edgecluster.units import format_bytes, parse_size


def _tls_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", type=Path, help="serve gRPC over TLS with this certificate")
    p.add_argument("--tls-key", type=Path)
    p.add_argument("--tls-ca", type=Path, help="CA to verify peers' certificates")


def add_http_api_args(p: argparse.ArgumentParser) -> None:
    """The HTTP API's flags (serve; train will reuse them)."""
    p.add_argument("--port", type=int, default=DEFAULT_HTTP_PORT, help="HTTP API port")
    p.add_argument(
        "--http-host",
        default="127.0.0.1",
        help="address the HTTP API listens on, independently of --host (0.0.0.0: all); "
        "beyond loopback an API key is required, and generated when not given",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("EDGE_API_KEY") or None,
        help="clients must send 'Authorization: Bearer KEY' on /v1/* (env EDGE_API_KEY)",
    )
    p.add_argument(
        "--cors-origins",
        default="",
        help="browser origins allowed to call the API, comma-separated, e.g. "
        "http://localhost:3000 ('*': any; default: none)",
    )
    p.add_argument(
        "--max-body", default="2MiB", help="largest request body, e.g. 2MiB (larger: 413)"
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=DEFAULT_MAX_QUEUE,
        help="requests that may wait for a place in the batch (more: 429 with Retry-After)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=DEFAULT_REQUEST_TIMEOUT_S,
        help="seconds a request may take in all; then it is cancelled (504)",
    )


def http_api_fields(args: argparse.Namespace, api_key: str | None) -> dict[str, Any]:
    """CoordinatorConfig fields from add_http_api_args' flags (ValueError when bad)."""
    try:
        max_body = parse_size(args.max_body)
    except ValueError as exc:
        raise ValueError(f"--max-body: {exc}") from None
    return {
        "http_host": args.http_host,
        "http_port": args.port,
        "api_key": api_key,
        "cors_origins": tuple(o.strip() for o in args.cors_origins.split(",") if o.strip()),
        "max_body_bytes": max_body,
        "max_queue": args.max_queue,
        "request_timeout_s": args.request_timeout,
    }


def resolve_api_key(args: argparse.Namespace) -> tuple[str | None, bool]:
    """(key, generated): an API beyond loopback never runs without a key."""
    if args.api_key:
        return args.api_key, False
    if is_loopback_host(args.http_host):
        return None, False
    from edgecluster.net.auth import generate_token

    return generate_token(), True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-coordinator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the coordinator (and serve a model)")
    serve.add_argument(
        "--model", default="none", help="none | smollm2-135m | checkpoint dir | .gguf"
    )
    add_cluster_args(serve)
    serve.add_argument(
        "--weights",
        metavar="fp32|bf16|int8|int4",
        help="how the layer matrices and the LM head are stored, sent and kept in memory: "
        "int8 per channel, int4 per group of 32 (default: what the checkpoint holds; int8 "
        "for a GGUF file quantized to 4 or 8 bits, such as the default model)",
    )
    serve.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        help="compute dtype (default: bfloat16 for --weights bf16, else float32)",
    )
    serve.add_argument(
        "--storage-dtype",
        choices=["float32", "bfloat16"],
        help="older spelling of --weights fp32|bf16",
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
    status = sub.add_parser("status", help="list the cluster's agents")
    status.add_argument("--coordinator", default=f"127.0.0.1:{DEFAULT_GRPC_PORT}")
    status.add_argument("--token", default=os.environ.get("EDGE_TOKEN"))
    status.add_argument("--json", action="store_true")
    _tls_args(status)
    from coordinator.train_cli import add_train_parser

    add_train_parser(sub)
    return parser


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    """The flags `serve` and `train` share: agents, addresses, token, API, TLS, logging."""
    p.add_argument("--local", type=int, default=0, help="start N local agents as children")
    p.add_argument(
        "--host", default="127.0.0.1", help="address for gRPC and data links (0.0.0.0: all)"
    )
    add_http_api_args(p)
    p.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT)
    p.add_argument("--data-port", type=int, default=0, help="data-channel port (default: any)")
    p.add_argument("--token", default=os.environ.get("EDGE_TOKEN"), help="cluster token")
    p.add_argument("--peers", default="", help="agents to invite, host:port,...")
    p.add_argument("--no-mdns", action="store_true")
    p.add_argument("--min-agents", type=int, help="agents to wait for (default: --local or 1)")
    p.add_argument("--link-delay-ms", type=float, help="inject per-link delay (experiments)")
    p.add_argument(
        "--cluster",
        metavar="FILE",
        type=Path,
        default=os.environ.get("EDGE_CLUSTER_FILE") or None,
        help="cluster file (JSON): emulate its links, per pair of agents (by --name; the "
        "coordinator is 'coordinator') its latency and bandwidth; train also plans with its "
        "devices (env EDGE_CLUSTER_FILE)",
    )
    p.add_argument("--log-level", default="INFO")
    _tls_args(p)


def _serve_config(args: argparse.Namespace, token: str, api_key: str | None) -> CoordinatorConfig:
    return CoordinatorConfig(
        dtype=args.dtype,
        weights=args.weights,
        storage_dtype=args.storage_dtype,
        max_context=args.max_context,
        kv_dtype=args.kv_dtype,
        kv_budget_tokens=args.kv_budget,
        memory_limit_bytes=parse_size(args.memory_limit) if args.memory_limit else 0,
        **cluster_fields(args, token, api_key, model=args.model),
    )


def cluster_fields(
    args: argparse.Namespace, token: str, api_key: str | None, *, model: str
) -> dict[str, Any]:
    """CoordinatorConfig fields of the flags `add_cluster_args` adds."""
    from edgecluster.net.datachannel import default_link_delay_ms

    delay = args.link_delay_ms if args.link_delay_ms is not None else default_link_delay_ms()
    return dict(
        token=token,
        model=model,
        host=args.host,
        grpc_port=args.grpc_port,
        data_port=args.data_port,
        peers=tuple(p.strip() for p in args.peers.split(",") if p.strip()),
        mdns=not args.no_mdns,
        local_agents=args.local,
        min_agents=args.min_agents or max(1, args.local),
        link_delay_ms=delay,
        cluster_file=str(args.cluster) if args.cluster else None,
        tls=TlsFiles(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca),
        cache_dir=cache_root(),
        **http_api_fields(args, api_key),
    )


def _announce(node: Any, token: str, generated: bool, api_key_generated: bool) -> None:
    cfg = node.config
    where = f"gRPC {cfg.host}:{node.grpc_port}, HTTP {cfg.http_host}:{cfg.http_port}"
    lines = [f"edgecluster coordinator: {where}"]
    if generated:
        lines.append(f"generated cluster token: {token}")
    lines.append(f"join a device:  edge-agent join {node.grpc_address} --token {token}")
    if api_key_generated:
        lines.append(
            f"generated API key: {cfg.api_key}  (clients send 'Authorization: Bearer KEY'; "
            "choose your own with --api-key or EDGE_API_KEY)"
        )
    grpc_local, http_local = is_loopback_host(cfg.host), is_loopback_host(cfg.http_host)
    if grpc_local:
        lines.append("(gRPC on loopback only; use --host 0.0.0.0 for devices on your LAN)")
    if http_local and not grpc_local:
        lines.append("(HTTP API on loopback only; --http-host 0.0.0.0 opens it, with an API key)")
    print("\n".join(lines), flush=True)
    if node.serving is not None:
        auth = _curl_auth(cfg.api_key, api_key_generated)
        threading.Thread(target=_print_when_ready, args=(node, auth), daemon=True).start()


def _curl_auth(api_key: str | None, generated: bool) -> str:
    """The curl header of the example: a key the user chose is not echoed."""
    if api_key is None:
        return ""
    value = api_key if generated else "$EDGE_API_KEY"
    return f' -H "Authorization: Bearer {value}"'


def _print_when_ready(node: Any, auth: str) -> None:
    while not node.serving.wait_ready(1.0):
        pass
    cfg = node.config
    host = "127.0.0.1" if cfg.http_host in ("0.0.0.0", "::", "") else cfg.http_host
    body = json.dumps(
        {
            "model": cfg.model,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 32,
            "temperature": 0,
        }
    )
    weights = node.serving.weights.describe()
    print(
        f"\nready: {cfg.model} on {len(node.membership.alive())} agents, {weights}. Try:\n"
        f"curl http://{host}:{cfg.http_port}/v1/chat/completions{auth} "
        f"-H 'Content-Type: application/json' -d '{body}'\n",
        flush=True,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from edgecluster.net.auth import generate_token
    from edgecluster.runtime.coordinator import run_coordinator

    token, generated = args.token, False
    if not token:
        token, generated = generate_token(), True
    api_key, api_key_generated = resolve_api_key(args)
    try:
        config = _serve_config(args, token, api_key)
    except ValueError as exc:
        print(f"edge-coordinator: {exc}", file=sys.stderr)
        return 2
    stop = ready_to_run(config)
    if stop is None:
        return 2

    def announce(node: Any) -> None:
        _announce(node, token, generated, api_key_generated)

    return run_coordinator(config, stop, on_ready=announce)


def ready_to_run(config: CoordinatorConfig) -> threading.Event | None:
    """The event SIGTERM and SIGINT set; None (one line printed) when a port is taken."""
    taken = _taken_port(config)
    if taken:
        print(f"edge-coordinator: {taken}", file=sys.stderr)
        return None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _taken_port(config: CoordinatorConfig) -> str | None:
    """Checked before anything is printed or loaded: one line naming the flag to change."""
    from edgecluster.runtime.ports import first_taken

    http_host = getattr(config, "http_host", config.host)  # the API may listen elsewhere
    return first_taken(
        [
            (http_host, config.http_port, "--port", "--port, or PORT=... for make serve"),
            (
                config.host,
                config.grpc_port,
                "--grpc-port",
                "--grpc-port, or GRPC_PORT=... for make serve",
            ),
            (config.host, config.data_port, "--data-port", "--data-port (0: any free port)"),
        ]
    )


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
    if args.command == "train":
        from coordinator.train_cli import cmd_train

        configure_logging("coordinator", args.log_level)
        return cmd_train(args)
    configure_logging("status", "WARNING")
    return cmd_status(args)


if __name__ == "__main__":
    sys.exit(main())
