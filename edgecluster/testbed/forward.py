"""Forward published ports from 127.0.0.1 on the host into a service's namespace.

The testbed bridge has no address on the host, so there is no route to a
service. Instead each accepted connection is handled by a thread that first
enters the service's network namespace (setns on that thread only), connects to
the service there, then copies bytes both ways. Listeners bind loopback only.

Run as the testbed supervisor:
    python -m edgecluster.testbed.forward 127.0.0.1:8000=ec-p-coordinator/10.77.0.10:8000
It prints "ready" once every port is bound, then serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import selectors
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from edgecluster.testbed.enter_namespace import enter_netns

logger = logging.getLogger(__name__)

_CHUNK = 64 * 1024


@dataclass(frozen=True, kw_only=True)
class Forward:
    listen_host: str
    listen_port: int
    netns: str
    target_host: str
    target_port: int

    def spec(self) -> str:
        target = f"{self.netns}/{self.target_host}:{self.target_port}"
        return f"{self.listen_host}:{self.listen_port}={target}"

    @classmethod
    def parse(cls, spec: str) -> Forward:
        listen, _, rest = spec.partition("=")
        netns, _, target = rest.partition("/")
        listen_host, _, listen_port = listen.rpartition(":")
        target_host, _, target_port = target.rpartition(":")
        if not (listen_port.isdigit() and target_port.isdigit() and netns and target_host):
            raise ValueError(f"bad forward {spec!r}: use HOST:PORT=NETNS/ADDRESS:PORT")
        return cls(
            listen_host=listen_host or "127.0.0.1",
            listen_port=int(listen_port),
            netns=netns,
            target_host=target_host,
            target_port=int(target_port),
        )


def listen(forward: Forward) -> socket.socket:
    try:
        server = socket.create_server((forward.listen_host, forward.listen_port), backlog=64)
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"cannot publish {forward.listen_host}:{forward.listen_port}: {exc.strerror}; "
            "free that port or change the service's `ports`",
        ) from exc
    return server


def serve(server: socket.socket, forward: Forward) -> None:
    """Accept forever; one thread per connection."""
    while True:
        client, _ = server.accept()
        threading.Thread(target=_relay, args=(client, forward), daemon=True).start()


def _relay(client: socket.socket, forward: Forward) -> None:
    try:
        enter_netns(forward.netns)
        upstream = socket.create_connection((forward.target_host, forward.target_port), 10)
    except OSError as exc:
        logger.warning("forward %s: %s", forward.spec(), exc)
        client.close()
        return
    with client, upstream:
        _copy_both_ways(client, upstream)


def _copy_both_ways(a: socket.socket, b: socket.socket) -> None:
    peers = {a: b, b: a}
    open_reads = 2
    with selectors.DefaultSelector() as selector:
        for sock in peers:
            sock.setblocking(True)
            selector.register(sock, selectors.EVENT_READ, data=sock)
        while open_reads:
            for key, _ in selector.select():
                sock = key.data
                try:
                    data = sock.recv(_CHUNK)
                except OSError:
                    data = b""
                if data:
                    with contextlib.suppress(OSError):
                        peers[sock].sendall(data)
                    continue
                selector.unregister(sock)
                open_reads -= 1
                with contextlib.suppress(OSError):
                    peers[sock].shutdown(socket.SHUT_WR)


def run_forwards(forwards: Sequence[Forward]) -> None:
    """Bind every listener, then serve each from a daemon thread until the process ends."""
    servers = [(listen(forward), forward) for forward in forwards]
    for server, forward in servers:
        threading.Thread(target=serve, args=(server, forward), daemon=True).start()
        logger.info("forwarding %s", forward.spec())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="testbed port forwarder (supervisor)")
    parser.add_argument("forwards", nargs="+", type=Forward.parse)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        run_forwards(args.forwards)
    except OSError as exc:
        logger.error("%s", exc)
        return 1
    print("ready", flush=True)
    sys.stdout.close()
    while not stop.wait(1.0):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
