"""`edge-agent join`: put this device in an edgecluster."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from edgecluster.config import AgentConfig, cache_root
from edgecluster.log import configure_logging
from edgecluster.net.grpc_util import TlsFiles
from edgecluster.runtime.data_dir_lock import DataDirInUse, first_free_data_dir, lock_data_dir
from edgecluster.units import parse_size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    join = sub.add_parser("join", help="join a cluster and serve its work")
    join.add_argument(
        "coordinator",
        nargs="?",
        help="coordinator host:grpc_port (default: find it over mDNS)",
    )
    join.add_argument(
        "--token", default=os.environ.get("EDGE_TOKEN"), help="cluster token (or EDGE_TOKEN)"
    )
    join.add_argument(
        "--name", help="this device's name (default: the host name, NAME-2... if it is taken)"
    )
    join.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: all)")
    join.add_argument("--port", type=int, default=0, help="gRPC port (default: any free)")
    join.add_argument("--data-port", type=int, default=0, help="data-channel port (default: any)")
    join.add_argument(
        "--data-dir", type=Path, help="shard cache (default: ~/.cache/edgecluster/agents/NAME)"
    )
    join.add_argument(
        "--cache-limit",
        default="20GiB",
        help="disk the shard cache may use; older shards the plan does not use are deleted "
        "beyond it (default 20GiB)",
    )
    join.add_argument("--memory-limit", help="promise to stay under this RSS, e.g. 512MiB, 2GiB")
    join.add_argument("--threads", type=int, default=0, help="torch threads (default: from cores)")
    join.add_argument(
        "--window", type=int, default=0, help="streaming window in blocks (default: auto)"
    )
    join.add_argument("--no-mdns", action="store_true", help="do not advertise or browse mDNS")
    join.add_argument("--tls-cert", type=Path)
    join.add_argument("--tls-key", type=Path)
    join.add_argument("--tls-ca", type=Path, help="CA that signed the coordinator's certificate")
    join.add_argument("--log-level", default="INFO")
    return parser


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    """The agent's config, its data dir locked for this process (DataDirInUse if taken).

    An agent given neither --name nor --data-dir takes the host name and its default
    dir, or the next free NAME-2, NAME-3, ... when another agent on this host holds it.
    """
    name, data_dir = args.name, args.data_dir
    if name is None and data_dir is None:
        host = socket.gethostname()
        name, data_dir = first_free_data_dir(cache_root() / "agents", host)
        if name != host:
            logging.getLogger(__name__).info(
                "the default data dir of %s is in use by another agent on this host; "
                "this one is %s (data dir %s)", host, name, data_dir,
            )  # fmt: skip
    name = name or socket.gethostname()
    data_dir = data_dir or cache_root() / "agents" / name
    lock_data_dir(data_dir)
    return AgentConfig(
        token=args.token or "",
        name=name,
        coordinator=args.coordinator,
        host=args.host,
        port=args.port,
        data_port=args.data_port,
        data_dir=data_dir,
        memory_limit_bytes=parse_size(args.memory_limit) if args.memory_limit else 0,
        cache_limit_bytes=parse_size(args.cache_limit),
        mdns=not args.no_mdns,
        threads=args.threads,
        window_blocks=args.window,
        tls=TlsFiles(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.name or socket.gethostname(), args.log_level)
    try:
        config = config_from_args(args)
    except (ValueError, DataDirInUse) as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.name, args.log_level)  # the name may be NAME-2 now
    from edgecluster.runtime.ports import first_taken

    taken = first_taken(
        [
            (config.host, config.port, "--port", "--port (0: any free port)"),
            (config.host, config.data_port, "--data-port", "--data-port (0: any free port)"),
        ]
    )
    if taken:
        print(f"edge-agent: {taken}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    from edgecluster.runtime.local_agents import die_with_parent

    die_with_parent()  # a `--local` child: leave with the coordinator that started us
    from edgecluster.runtime.agent import run_agent  # heavy imports after argument checks

    return run_agent(config, stop)


if __name__ == "__main__":
    sys.exit(main())
