"""Start one compose service: inside its network namespace and its emulated device.

The command runs as `python -m edgecluster.testbed.enter_namespace --netns <ns>
--bind <hosts>:/etc/hosts [--bind <volume>:<target>] -- <program> args`, spawned
into the service's cgroups before it executes anything, with its own session
(so `down` can signal its whole process group) and its output in
`<state-dir>/logs/<service>.log`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from edgecluster.device import block, cgroup_v1
from edgecluster.device.emulated import DeviceLimits, EmulatedDevice
from edgecluster.testbed.compose import ComposeError, ComposeProject, Service
from edgecluster.testbed.netns import hosts_path
from edgecluster.testbed.processes import (
    ProcessRecord,
    record,
    resolve_program,
    service_environment,
)
from edgecluster.testbed.state import ServiceRecord
from edgecluster.testbed.topology import Endpoint

logger = logging.getLogger(__name__)

LINK_DELAY_ENV = "EDGE_LINK_DELAY_MS"
CLUSTER_FILE_ENV = "EDGE_CLUSTER_FILE"
LINKS_FILE = "links.json"


def device_limits(service: Service) -> DeviceLimits:
    """The service's cpus, mem_limit and first device_read_bps as emulated-device limits."""
    device, rate = service.read_bps[0] if service.read_bps else (None, None)
    if len(service.read_bps) > 1:
        logger.warning("service %s: only the first device_read_bps entry is applied", service.name)
    if device is not None:
        try:
            block.parse_device(device)
        except ValueError:
            logger.warning(
                "service %s: blkio device %s is not here; throttling the disk that holds the "
                "testbed state instead (set EDGE_BLKIO_DEVICE to pick one)",
                service.name,
                device,
            )
            device = None
    return DeviceLimits(
        memory_bytes=service.mem_limit_bytes,
        cpus=service.cpus,
        read_bytes_per_s=rate,
        device=device,
    )


def write_links_file(compose: ComposeProject, state_dir: Path) -> Path | None:
    """The per-pair links of x-edgecluster as a links file in `state_dir` (the cluster
    file's vocabulary, which `edge-coordinator serve --cluster` reads); its path, or
    None when the compose file gives none."""
    if compose.pair_links is None:
        return None
    path = state_dir / LINKS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(compose.pair_links.to_dict(), indent=2) + "\n")
    return path


def link_environment(
    service: Service, compose: ComposeProject, links_file: Path | None = None
) -> dict[str, str]:
    """EDGE_LINK_DELAY_MS from x-edgecluster.links (per service), or EDGE_CLUSTER_FILE
    naming `links_file` (per pair); either must agree with one set by hand."""
    link = compose.links.get(service.name)
    env = {}
    if link is not None and link.delay_ms is not None:
        env[LINK_DELAY_ENV] = f"{link.delay_ms:g}"
    if links_file is not None:
        env[CLUSTER_FILE_ENV] = str(links_file)
    for name, value in env.items():
        given = service.environment.get(name)
        same = given == value if name == CLUSTER_FILE_ENV else float(given or 0) == float(value)
        if given is not None and not same:
            raise ComposeError(
                f"service {service.name}: environment {name}={given} disagrees with "
                f"x-edgecluster (which sets {value}); keep one of them"
            )
    return env


def volume_binds(service: Service, volumes_dir: Path) -> list[tuple[Path, Path]]:
    """(host source, target) per volume; named volumes live under `volumes_dir`."""
    binds = []
    for volume in service.volumes:
        source = Path(volume.source) if volume.is_bind else volumes_dir / volume.source
        if volume.is_bind and not source.exists():
            raise ComposeError(f"service {service.name}: bind source {source} does not exist")
        source.mkdir(parents=True, exist_ok=True)
        binds.append((source, Path(volume.target)))
    return binds


def service_argv(service: Service, netns: str, binds: list[tuple[Path, Path]]) -> list[str]:
    """The command line that enters the service's namespaces, then runs its command."""
    command = [resolve_program(service.command[0]), *service.command[1:]]
    binds = [(hosts_path(netns), Path("/etc/hosts")), *binds]
    flags = [f"--bind={source}:{target}" for source, target in binds]
    enter = [sys.executable, "-m", "edgecluster.testbed.enter_namespace", f"--netns={netns}"]
    return [*enter, *flags, "--", *command]


def start_service(
    service: Service,
    endpoint: Endpoint,
    *,
    argv: list[str],
    extra_env: Mapping[str, str],
    state_dir: Path,
) -> ServiceRecord:
    """Create the service's emulated device and start `argv` in it."""
    device = EmulatedDevice(endpoint.netns, device_limits(service), io_path=state_dir).open()
    log_path = state_dir / "logs" / f"{service.name}.log"
    env = service_environment(service, extra_env)
    return ServiceRecord(
        name=service.name,
        netns=endpoint.netns,
        veth=endpoint.veth,
        address=endpoint.address,
        cgroup=device.name,
        log=str(log_path),
        argv=tuple(argv),
        process=_spawn(service.name, device, argv, env, log_path),
    )


def restart_service(
    service: Service, record: ServiceRecord, *, extra_env: Mapping[str, str], state_dir: Path
) -> ServiceRecord:
    """Start `record`'s command again: same namespace, same cgroups (limits kept), same
    volumes. Whatever still runs in those cgroups is killed first; the log is appended to."""
    device = EmulatedDevice(record.cgroup, DeviceLimits(), io_path=state_dir)  # limits stay
    cgroup_v1.kill_group_processes(list(device.paths.values()))
    log_path = Path(record.log)
    with log_path.open("ab") as log:
        log.write(f"--- edge-testbed: restarting {service.name} ---\n".encode())
    env = service_environment(service, extra_env)
    process = _spawn(service.name, device, list(record.argv), env, log_path)
    return dataclasses.replace(record, process=process)


def _spawn(
    name: str, device: EmulatedDevice, argv: list[str], env: Mapping[str, str], log_path: Path
) -> ProcessRecord | None:
    """Start `argv` in `device` in a session of its own, output appended to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = device.popen(
            argv,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    logger.info("started %s (pid %d) in %s", name, proc.pid, device.name)
    try:
        return record(proc.pid)
    except ProcessLookupError:
        logger.warning("service %s exited at once; see %s", name, log_path)
        return None
