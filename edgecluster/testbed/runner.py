"""Bring a compose project up as namespaces, cgroups and processes on this host; take it down.

`up` refuses while anything of the project is left over, writes the state file
first, builds the bridge and one namespace per service, starts each service in
dependency order inside its namespace and emulated device, and starts the
supervisor that forwards published ports from 127.0.0.1. `restart` starts one
service's recorded command again in its namespace, cgroups and volumes. `down`
removes all of it by name (from the state file and, when given, the compose
file), and is idempotent. Needs root.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from edgecluster.device import cgroup_v1
from edgecluster.device.emulated import available as emulated_available
from edgecluster.errors import EdgeClusterError
from edgecluster.testbed import launch, netns, processes, state
from edgecluster.testbed.compose import ComposeProject, Service
from edgecluster.testbed.forward import Forward, run_forwards
from edgecluster.testbed.state import ServiceRecord, TestbedState
from edgecluster.testbed.topology import Topology, bridge_name, plan_topology, veth_prefix

logger = logging.getLogger(__name__)

SUPERVISOR_READY_TIMEOUT_S = 20.0


class TestbedError(EdgeClusterError):
    """The testbed cannot be brought up (or down) as asked."""


@dataclass(frozen=True, kw_only=True)
class ServiceStatus:
    name: str
    address: str
    netns: str
    pid: int | None
    alive: bool
    log: str


def default_state_dir(project: str) -> Path:
    return Path(f"/tmp/edge-testbed-{project}")


def missing_requirements() -> str | None:
    """None when this host can run a testbed, else what is missing."""
    if os.geteuid() != 0:
        return "the testbed needs root (network namespaces and cgroups)"
    tools = netns.missing_tools()
    if tools:
        return f"the testbed needs {', '.join(tools)} (package iproute2)"
    return emulated_available()


def find_leftovers(project: str, state_dir: Path, compose: ComposeProject | None) -> list[str]:
    """Everything of `project` that exists now: state file, namespaces, links, cgroups."""
    names = _known_names(project, state_dir, compose)
    found = [str(state.state_path(state_dir))] if state.state_path(state_dir).exists() else []
    found += [f"netns {ns}" for ns in netns.list_netns() if ns in names.netns]
    found += [f"link {link}" for link in netns.list_links() if _is_ours(project, link)]
    found += [f"cgroup {c}/{cgroup_v1.GROUP_PARENT}/{n}" for c, n in _existing_cgroups(names)]
    found += [
        f"hosts {netns.ETC_NETNS / ns}" for ns in names.netns if (netns.ETC_NETNS / ns).exists()
    ]
    return found


def up(
    compose: ComposeProject, *, project: str, state_dir: Path, supervise: bool = True
) -> TestbedState:
    """Create the testbed and start every service; with `supervise`, the port forwarder too."""
    reason = missing_requirements()
    if reason is not None:
        raise TestbedError(reason)
    topology = plan_topology(project, compose)
    leftovers = find_leftovers(project, state_dir, compose)
    if leftovers:
        raise TestbedError(
            f"testbed {project} is not clean: {', '.join(leftovers)}; "
            f"run `edge-testbed down --project {project} --state-dir {state_dir}` first"
        )
    current = _initial_state(topology, compose, state_dir)
    state.save(current, state_dir)
    try:
        _build_network(topology)
        current = _start_services(compose, topology, current, state_dir)
        if supervise and current.forwards:
            current = dataclasses.replace(current, supervisor=_start_supervisor(current, state_dir))
            state.save(current, state_dir)
    except BaseException:
        logger.error("testbed %s failed to come up; removing what was created", project)
        try:
            down(project=project, state_dir=state_dir, compose=compose)
        except TestbedError as exc:
            logger.error("%s", exc)
        raise
    return current


def _initial_state(topology: Topology, compose: ComposeProject, state_dir: Path) -> TestbedState:
    forwards = tuple(
        Forward(
            listen_host="127.0.0.1",
            listen_port=port.host_port,
            netns=topology.endpoint(service.name).netns,
            target_host=topology.endpoint(service.name).address,
            target_port=port.container_port,
        ).spec()
        for service in compose.services.values()
        for port in service.ports
    )
    records = tuple(
        ServiceRecord(
            name=endpoint.service,
            netns=endpoint.netns,
            veth=endpoint.veth,
            address=endpoint.address,
            cgroup=endpoint.netns,
            log=str(state_dir / "logs" / f"{endpoint.service}.log"),
        )
        for endpoint in topology.endpoints
    )
    return TestbedState(
        project=topology.project,
        bridge=topology.bridge,
        veth_prefix=veth_prefix(topology.project),
        subnet=topology.subnet,
        services=records,
        forwards=forwards,
        mountpoints=_volume_mountpoints(compose),
    )


def _volume_mountpoints(compose: ComposeProject) -> tuple[str, ...]:
    """Directories missing on the host that volume targets need, deepest first."""
    missing = set()
    for service in compose.services.values():
        for volume in service.volumes:
            path = Path(volume.target)
            while not path.exists():
                missing.add(str(path))
                path = path.parent
    return tuple(sorted(missing, key=lambda path: (-path.count("/"), path)))


def _build_network(topology: Topology) -> None:
    netns.create_bridge(topology.bridge)
    for endpoint in topology.endpoints:
        netns.create_endpoint(topology.bridge, endpoint)
        netns.write_hosts(endpoint.netns, topology.hosts())


def _start_services(
    compose: ComposeProject, topology: Topology, current: TestbedState, state_dir: Path
) -> TestbedState:
    for target in current.mountpoints:
        Path(target).mkdir(parents=True, exist_ok=True)
    links_file = launch.write_links_file(compose, state_dir)
    for name in compose.start_order():
        service, endpoint = compose.services[name], topology.endpoint(name)
        binds = launch.volume_binds(service, state_dir / "volumes")
        started = launch.start_service(
            service,
            endpoint,
            argv=launch.service_argv(service, endpoint.netns, binds),
            extra_env=launch.link_environment(service, compose, links_file),
            state_dir=state_dir,
        )
        services = tuple(started if s.name == name else s for s in current.services)
        current = dataclasses.replace(current, services=services)
        state.save(current, state_dir)
    return current


def _start_supervisor(current: TestbedState, state_dir: Path) -> processes.ProcessRecord:
    argv = [sys.executable, "-m", "edgecluster.testbed.forward", *current.forwards]
    with (state_dir / "logs" / "supervisor.log").open("ab") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
            start_new_session=True,
        )  # fmt: skip
    assert proc.stdout is not None
    readable, _, _ = select.select([proc.stdout], [], [], SUPERVISOR_READY_TIMEOUT_S)
    line = proc.stdout.readline() if readable else b""
    proc.stdout.close()
    if line.strip() != b"ready":
        proc.kill()
        proc.wait()
        log_path = state_dir / "logs" / "supervisor.log"
        last = (log_path.read_text().strip().splitlines() or ["(no output)"])[-1]
        raise TestbedError(f"the port forwarder did not start: {last} (log: {log_path})")
    return processes.record(proc.pid)


def serve_foreground(current: TestbedState, stop: threading.Event) -> None:
    """Forward published ports from this process until `stop` is set."""
    run_forwards([Forward.parse(spec) for spec in current.forwards])
    while not stop.wait(1.0):
        pass


def down(
    *,
    project: str,
    state_dir: Path,
    compose: ComposeProject | None = None,
    remove_volumes: bool = False,
    grace_s: float = 5.0,
) -> list[str]:
    """Stop and remove everything of `project`; what was removed. Safe to repeat."""
    current = _load_state(project, state_dir)
    namespaces = sorted(_known_names(project, state_dir, compose).netns)
    recorded = [s.process for s in current.services if s.process] if current else []
    supervisor = [current.supervisor] if current and current.supervisor else []
    processes.stop([*supervisor, *recorded], grace_s)
    for ns in namespaces:
        processes.kill_pids(netns.netns_pids(ns))
    links = [link for link in netns.list_links() if _is_ours(project, link)]
    steps: list[tuple[str, Callable[[], bool]]] = [
        *((f"cgroup {ns}", partial(cgroup_v1.remove_named, ns)) for ns in namespaces),
        *((f"link {link}", partial(netns.delete_link, link)) for link in links),
        *((f"netns {ns}", partial(netns.delete_netns, ns)) for ns in namespaces),
        *((f"hosts {ns}", partial(netns.remove_hosts, ns)) for ns in namespaces),
        *((f"mountpoint {d}", partial(_remove_empty_dir, d)) for d in _mountpoints(current)),
        (
            f"links {state_dir / launch.LINKS_FILE}",
            partial(_remove_file, state_dir / launch.LINKS_FILE),
        ),
    ]
    if remove_volumes:
        steps.append(
            (f"volumes {state_dir / 'volumes'}", partial(_remove_tree, state_dir / "volumes"))
        )
    removed = _run_steps(steps)
    if state.remove(state_dir):
        removed.append(f"state {state.state_path(state_dir)}")
    logger.info("testbed %s down: removed %d things", project, len(removed))
    return removed


def restart(
    compose: ComposeProject, *, project: str, state_dir: Path, service: str, grace_s: float = 5.0
) -> ServiceRecord:
    """Stop `service` if it still runs and start its command again in the same namespace,
    cgroups and volumes (as `docker compose restart` does); its new record."""
    current = _load_state(project, state_dir)
    if current is None:
        raise TestbedError(f"testbed {project} is not up (no state in {state_dir}); run `up`")
    names = [record.name for record in current.services]
    if service not in names or service not in compose.services:
        raise TestbedError(f"testbed {project} has no service {service!r}; it has {names}")
    record, spec = current.service(service), compose.services[service]
    _check_restartable(record, spec, state_dir)
    if record.process is not None:
        processes.stop([record.process], grace_s)
    links_file = launch.write_links_file(compose, state_dir)
    extra_env = launch.link_environment(spec, compose, links_file)
    restarted = launch.restart_service(spec, record, extra_env=extra_env, state_dir=state_dir)
    services = tuple(restarted if s.name == service else s for s in current.services)
    state.save(dataclasses.replace(current, services=services), state_dir)
    return restarted


def _check_restartable(record: ServiceRecord, spec: Service, state_dir: Path) -> None:
    """The service's namespace and cgroups still exist and its command is unchanged."""
    missing = [] if record.netns in netns.list_netns() else [f"netns {record.netns}"]
    missing += [
        f"cgroup {controller}"
        for controller in cgroup_v1.CONTROLLERS
        if not cgroup_v1.group_path(controller, record.cgroup).is_dir()
    ]
    if missing:
        raise TestbedError(
            f"service {record.name} cannot be restarted: {', '.join(missing)} is gone; "
            "run `edge-testbed down`, then `up`"
        )
    binds = launch.volume_binds(spec, state_dir / "volumes")
    if tuple(launch.service_argv(spec, record.netns, binds)) != record.argv:
        raise TestbedError(
            f"service {record.name}: the compose file changed since `up` (its command or "
            "volumes differ); run `edge-testbed down`, then `up`"
        )


def _load_state(project: str, state_dir: Path) -> TestbedState | None:
    current = state.load(state_dir)
    if current is not None and current.project != project:
        raise TestbedError(
            f"{state_dir} holds testbed {current.project!r}, not {project!r}; "
            f"pass --project {current.project} or another --state-dir"
        )
    return current


def _run_steps(steps: Sequence[tuple[str, Callable[[], bool]]]) -> list[str]:
    """Run every removal even when one fails; raise after, naming all that failed."""
    removed, failed = [], []
    for label, step in steps:
        try:
            if step():
                removed.append(label)
        except (OSError, EdgeClusterError) as exc:
            failed.append(f"{label}: {exc}")
    if failed:
        raise TestbedError("could not remove " + "; ".join(failed) + "; run down again")
    return removed


def _mountpoints(current: TestbedState | None) -> tuple[str, ...]:
    return current.mountpoints if current else ()


def _remove_empty_dir(path: str) -> bool:
    if not os.path.isdir(path):
        return False
    try:
        os.rmdir(path)
    except OSError:
        logger.warning("left %s in place: something was written into it", path)
        return False
    return True


def _remove_file(path: Path) -> bool:
    if not path.exists():
        return False
    path.unlink()
    return True


def _remove_tree(path: Path) -> bool:
    if not path.exists():
        return False
    shutil.rmtree(path)
    return True


def status(state_dir: Path) -> tuple[TestbedState | None, list[ServiceStatus]]:
    current = state.load(state_dir)
    if current is None:
        return None, []
    return current, [
        ServiceStatus(
            name=service.name,
            address=service.address,
            netns=service.netns,
            pid=service.process.pid if service.process else None,
            alive=service.process is not None and processes.is_alive(service.process),
            log=service.log,
        )
        for service in current.services
    ]


@dataclass(frozen=True)
class _Names:
    netns: frozenset[str]


def _known_names(project: str, state_dir: Path, compose: ComposeProject | None) -> _Names:
    found = set()
    current = state.load(state_dir)
    if current is not None:
        found |= {service.netns for service in current.services}
    if compose is not None:
        found |= {endpoint.netns for endpoint in plan_topology(project, compose).endpoints}
    return _Names(netns=frozenset(found))


def _is_ours(project: str, link: str) -> bool:
    return link == bridge_name(project) or link.startswith(veth_prefix(project))


def _existing_cgroups(names: _Names) -> list[tuple[str, str]]:
    return [
        (controller, name)
        for name in sorted(names.netns)
        for controller in cgroup_v1.CONTROLLERS
        if cgroup_v1.group_path(controller, name).is_dir()
    ]
