"""edge-testbed: run a compose file's services as emulated devices on this host (root).

edge-testbed up     [-f docker/compose.yaml] [--project NAME] [--state-dir DIR] [--foreground]
edge-testbed down   [-f ...] [--project NAME] [--state-dir DIR] [--volumes]
edge-testbed status [-f ...] [--project NAME] [--state-dir DIR]
edge-testbed restart SERVICE [-f ...] [--project NAME] [--state-dir DIR]
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgecluster.errors import EdgeClusterError
from edgecluster.testbed import runner
from edgecluster.testbed.compose import ComposeProject, load_compose

DEFAULT_COMPOSE = Path("docker/compose.yaml")


@dataclass(frozen=True, kw_only=True)
class TestbedCommand:
    action: str
    compose: ComposeProject | None
    project: str
    state_dir: Path
    foreground: bool = False
    remove_volumes: bool = False
    service: str | None = None  # restart: the one service


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="edge-testbed", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["up", "down", "status", "restart"])
    parser.add_argument("service", nargs="?", help="restart: the service to restart")
    parser.add_argument("-f", "--file", type=Path, help=f"compose file ({DEFAULT_COMPOSE})")
    parser.add_argument("--project", help="project name (default: the file's `name`)")
    parser.add_argument("--state-dir", type=Path, help="default /tmp/edge-testbed-<project>")
    parser.add_argument("--foreground", action="store_true", help="up: stay, down on Ctrl-C")
    parser.add_argument("--volumes", action="store_true", help="down: delete named volumes too")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_intermixed_args(argv)


def _build_command(args: argparse.Namespace) -> TestbedCommand:
    if (args.action == "restart") != (args.service is not None):
        raise ValueError("name one service with `restart SERVICE`, and only with restart")
    path = args.file or DEFAULT_COMPOSE
    compose = None
    if args.file is not None or args.action in ("up", "restart") or path.exists():
        compose = load_compose(path)
    project = args.project or _default_project(compose, path)
    if project is None:
        raise ValueError("no compose file to name the project: pass --project NAME")
    return TestbedCommand(
        action=args.action,
        compose=compose,
        project=project,
        state_dir=args.state_dir or runner.default_state_dir(project),
        foreground=args.foreground,
        remove_volumes=args.volumes,
        service=args.service,
    )


def _default_project(compose: ComposeProject | None, path: Path) -> str | None:
    if compose is None:
        return None
    if compose.name:
        return compose.name
    return re.sub(r"[^a-z0-9_-]", "", path.resolve().parent.name.lower()) or "testbed"


def run_testbed(command: TestbedCommand) -> int:
    if command.action == "up":
        return _up(command)
    if command.action == "down":
        removed = runner.down(
            project=command.project,
            state_dir=command.state_dir,
            compose=command.compose,
            remove_volumes=command.remove_volumes,
        )
        print("\n".join(f"removed {item}" for item in removed) or "nothing to remove")
        return 0
    if command.action == "restart":
        return _restart(command)
    return _status(command)


def _up(command: TestbedCommand) -> int:
    assert command.compose is not None
    current = runner.up(
        command.compose,
        project=command.project,
        state_dir=command.state_dir,
        supervise=not command.foreground,
    )
    _status(command)
    if command.foreground:
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        try:
            runner.serve_foreground(current, stop)
        finally:
            runner.down(project=command.project, state_dir=command.state_dir)
    return 0


def _restart(command: TestbedCommand) -> int:
    assert command.compose is not None and command.service is not None
    record = runner.restart(
        command.compose,
        project=command.project,
        state_dir=command.state_dir,
        service=command.service,
    )
    pid = record.process.pid if record.process else None
    print(f"restarted {record.name} (pid {pid}) in {record.netns}; log: {record.log}")
    return 0 if record.process is not None else 1


def _status(command: TestbedCommand) -> int:
    current, services = runner.status(command.state_dir)
    if current is None:
        print(f"testbed {command.project} is down (no state in {command.state_dir})")
        return 1
    print(f"testbed {current.project}: bridge {current.bridge}, subnet {current.subnet}")
    for forward in current.forwards:
        print(f"  published {forward}")
    for service in services:
        alive = "up" if service.alive else "DOWN"
        line = f"{service.name:<16} {service.address:<15} pid {service.pid}  {alive}"
        print(f"  {line}  {service.log}")
    return 0 if all(service.alive for service in services) else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if os.geteuid() != 0:
        print("edge-testbed needs root (network namespaces, veths, cgroups); run it with sudo",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        return run_testbed(_build_command(args))
    except (EdgeClusterError, ValueError, OSError) as exc:
        print(f"edge-testbed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
