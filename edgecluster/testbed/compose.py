"""Read the subset of a Compose file the testbed emulates into frozen dataclasses.

Supported per service: command (and entrypoint), environment, cpus, mem_limit,
blkio_config.device_read_bps, ports (TCP, host:container), networks with
ipv4_address, depends_on, volumes (named volumes and absolute host paths). One
bridge network with an IPv4 subnet. `${VAR}`, `${VAR:-default}` and `$$` are
interpolated from the environment as Compose does.

The `x-edgecluster` extension describes the network, in one of two forms:
- per pair, in the cluster file's vocabulary (plan/cluster_file.py), emulated by the
  sessions themselves (each link holds what it receives; see net/link.py):
  `default_link: {latency_ms: 2, bandwidth_mb_s: 100}` (optional: pairs not listed
  are then not emulated) and `links: [{from: a, to: b, latency_ms: 30,
  bandwidth_mb_s: 12.5}]` (symmetric unless both directions are given), `from` and
  `to` naming services (agents by their service name, the coordinator as
  `coordinator`). The testbed writes them to a file named by EDGE_CLUSTER_FILE in
  every service's environment, which `edge-coordinator serve` reads;
- per service (a mapping): `links: {service: {bandwidth: 100mbit, delay_ms: 2}}`,
  the bandwidth a tc token bucket on the service's veth, the delay EDGE_LINK_DELAY_MS.

Keys that would change behaviour but cannot be emulated raise ComposeError;
keys that only matter to Docker (image, build, restart...) are ignored.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edgecluster.plan.cluster_file import LinkTable, parse_links
from edgecluster.testbed.compose_values import (
    ComposeError,
    as_mapping,
    interpolate,
    parse_bandwidth,
    parse_docker_bytes,
)

__all__ = ["ComposeError", "ComposeProject", "LinkShaping", "PortMapping", "Service"]
__all__ += ["VolumeMount", "load_compose", "parse_compose"]

logger = logging.getLogger(__name__)

EXTENSION_KEY = "x-edgecluster"
DEFAULT_SUBNET = "10.77.0.0/24"
_SERVICE_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
_SUPPORTED = {
    "command", "entrypoint", "environment", "cpus", "mem_limit", "blkio_config",
    "ports", "networks", "depends_on", "volumes",
}  # fmt: skip
_IGNORED = {
    "image", "build", "container_name", "restart", "init", "labels", "logging",
    "healthcheck", "stop_signal", "stop_grace_period", "hostname", "tty", "stdin_open",
    "platform", "pull_policy", "expose",
}  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class PortMapping:
    host_port: int
    container_port: int


@dataclass(frozen=True, kw_only=True)
class VolumeMount:
    """`source` is a named volume, or an absolute host path when `is_bind`."""

    source: str
    target: str
    is_bind: bool


@dataclass(frozen=True, kw_only=True)
class Service:
    name: str
    command: tuple[str, ...]
    environment: Mapping[str, str] = field(default_factory=dict)
    cpus: float | None = None
    mem_limit_bytes: int | None = None
    read_bps: tuple[tuple[str, int], ...] = ()  # (device path, bytes/s)
    ports: tuple[PortMapping, ...] = ()
    network: str | None = None
    ipv4_address: str | None = None
    depends_on: tuple[str, ...] = ()
    volumes: tuple[VolumeMount, ...] = ()


@dataclass(frozen=True, kw_only=True)
class LinkShaping:
    bandwidth_bits_per_s: int | None = None
    delay_ms: float | None = None


@dataclass(frozen=True, kw_only=True)
class ComposeProject:
    name: str | None
    services: Mapping[str, Service]
    network: str
    subnet: ipaddress.IPv4Network
    links: Mapping[str, LinkShaping] = field(default_factory=dict)  # per service (tc)
    pair_links: LinkTable | None = None  # per pair, emulated by the sessions

    def start_order(self) -> list[str]:
        """Service names with every service after the ones it depends on."""
        order: list[str] = []

        def visit(name: str, path: tuple[str, ...]) -> None:
            if name in path:
                raise ComposeError(f"depends_on cycle: {' -> '.join((*path, name))}")
            if name not in order:
                for dep in self.services[name].depends_on:
                    visit(dep, (*path, name))
                order.append(name)

        for name in self.services:
            visit(name, ())
        return order


def load_compose(
    path: str | os.PathLike[str], env: Mapping[str, str] | None = None
) -> ComposeProject:
    """Parse and check the compose file at `path`, interpolating from `env` (os.environ)."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ComposeError(f"cannot read compose file {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ComposeError(f"{path}: expected a mapping at the top level")
    return parse_compose(interpolate(raw, os.environ if env is None else env))


def parse_compose(raw: Mapping[str, Any]) -> ComposeProject:
    """ComposeProject from an already interpolated compose document."""
    network, subnet = _parse_network(as_mapping(raw.get("networks"), "networks"))
    services_raw = as_mapping(raw.get("services"), "services")
    if not services_raw:
        raise ComposeError("the compose file has no services")
    services = {name: _parse_service(name, spec, network) for name, spec in services_raw.items()}
    for service in services.values():
        unknown = set(service.depends_on) - set(services)
        if unknown:
            raise ComposeError(f"service {service.name} depends on unknown {sorted(unknown)}")
    extension = as_mapping(raw.get(EXTENSION_KEY), EXTENSION_KEY)
    extra = sorted(set(extension) - {"links", "default_link"})
    if extra:
        raise ComposeError(
            f"{EXTENSION_KEY} has unknown key(s) {extra}; allowed: links, default_link"
        )
    links: dict[str, LinkShaping] = {}
    pair_links: LinkTable | None = None
    if isinstance(extension.get("links"), list) or "default_link" in extension:
        pair_links = _parse_pair_links(extension, services)
    else:
        where = f"{EXTENSION_KEY}.links"
        links = _parse_links(as_mapping(extension.get("links"), where), services)
    project = ComposeProject(
        name=raw.get("name"),
        services=services,
        network=network,
        subnet=subnet,
        links=links,
        pair_links=pair_links,
    )
    project.start_order()  # reject cycles now
    return project


def _parse_network(networks: Mapping[str, Any]) -> tuple[str, ipaddress.IPv4Network]:
    if len(networks) > 1:
        raise ComposeError(
            f"the testbed builds one bridge; the file declares {sorted(networks)}: keep one"
        )
    if not networks:
        return "default", ipaddress.IPv4Network(DEFAULT_SUBNET)
    name, spec = next(iter(networks.items()))
    spec = as_mapping(spec, f"networks.{name}")
    if spec.get("driver", "bridge") != "bridge" or spec.get("external"):
        raise ComposeError(f"network {name}: only a local bridge network can be emulated")
    configs = as_mapping(spec.get("ipam"), f"networks.{name}.ipam").get("config") or []
    subnets = [c["subnet"] for c in configs if isinstance(c, dict) and "subnet" in c]
    try:
        subnet = ipaddress.IPv4Network(subnets[0] if subnets else DEFAULT_SUBNET)
    except ValueError as exc:
        raise ComposeError(f"network {name}: bad subnet: {exc}") from exc
    return name, subnet


def _parse_service(name: str, spec: Any, network: str) -> Service:
    if not _SERVICE_NAME_RE.match(name):
        raise ComposeError(f"service name {name!r}: use letters, digits, '_', '.', '-'")
    spec = as_mapping(spec, f"services.{name}")
    for key in sorted(set(spec) - _SUPPORTED):
        if key not in _IGNORED:
            raise ComposeError(
                f"service {name} uses {key!r}, which the testbed cannot emulate; remove it "
                "or run the file with `docker compose`"
            )
        logger.debug("service %s: ignoring %r (only Docker uses it)", name, key)
    ipv4 = _parse_service_network(name, spec.get("networks"), network)
    return Service(
        name=name,
        command=_parse_command(name, spec),
        environment=_parse_environment(name, spec.get("environment")),
        cpus=None if spec.get("cpus") is None else float(spec["cpus"]),
        mem_limit_bytes=_optional_bytes(spec.get("mem_limit"), f"{name}.mem_limit"),
        read_bps=_parse_blkio(name, spec.get("blkio_config")),
        ports=tuple(_parse_port(name, port) for port in spec.get("ports") or ()),
        network=network,
        ipv4_address=ipv4,
        depends_on=tuple(as_mapping(spec.get("depends_on"), f"{name}.depends_on", lists=True)),
        volumes=tuple(_parse_volume(name, volume) for volume in spec.get("volumes") or ()),
    )


def _parse_command(name: str, spec: Mapping[str, Any]) -> tuple[str, ...]:
    parts: list[str] = []
    for key in ("entrypoint", "command"):
        value = spec.get(key)
        parts += shlex.split(value) if isinstance(value, str) else [str(v) for v in value or ()]
    if not parts:
        raise ComposeError(
            f"service {name} has no command; the testbed runs commands on this host, "
            "it cannot run an image's default command"
        )
    return tuple(parts)


def _parse_environment(name: str, value: Any) -> dict[str, str]:
    if isinstance(value, list):
        # "KEY" without a value inherits from the host, which every service does anyway
        pairs = [item.partition("=") for item in map(str, value)]
        return {key: val for key, sep, val in pairs if sep}
    return {
        key: "" if val is None else str(val).lower() if isinstance(val, bool) else str(val)
        for key, val in as_mapping(value, f"{name}.environment").items()
    }


def _optional_bytes(value: Any, where: str) -> int | None:
    if value is None:
        return None
    try:
        return parse_docker_bytes(value)
    except ValueError as exc:
        raise ComposeError(f"{where}: {exc}") from exc


def _parse_blkio(name: str, value: Any) -> tuple[tuple[str, int], ...]:
    blkio = as_mapping(value, f"{name}.blkio_config")
    unsupported = set(blkio) - {"device_read_bps"}
    if unsupported:
        raise ComposeError(f"service {name}: blkio_config supports device_read_bps only")
    rates = []
    for entry in blkio.get("device_read_bps") or ():
        if not isinstance(entry, dict) or "path" not in entry or "rate" not in entry:
            raise ComposeError(f"service {name}: device_read_bps entries need path and rate")
        rate = _optional_bytes(entry["rate"], f"{name}.blkio_config rate") or 0
        if rate <= 0:
            raise ComposeError(f"service {name}: device_read_bps rate must be positive")
        rates.append((str(entry["path"]), rate))
    return tuple(rates)


def _parse_port(name: str, port: Any) -> PortMapping:
    if isinstance(port, dict):
        published, target = port.get("published"), port.get("target")
        protocol = port.get("protocol", "tcp")
    else:
        text, _, protocol = str(port).partition("/")
        fields = text.split(":")
        published, target = (fields[-2], fields[-1]) if len(fields) >= 2 else (None, fields[0])
    if (protocol or "tcp") == "tcp" and str(published).isdigit() and str(target).isdigit():
        return PortMapping(host_port=int(str(published)), container_port=int(str(target)))
    raise ComposeError(
        f"service {name}: port {port!r}: the testbed forwards single TCP ports given "
        "as HOST:CONTAINER"
    )


def _parse_service_network(name: str, value: Any, network: str) -> str | None:
    networks = as_mapping(value, f"{name}.networks", lists=True)
    if set(networks) - {network}:
        raise ComposeError(f"service {name}: joins {sorted(networks)}; only {network} exists")
    settings = as_mapping(networks.get(network), f"{name}.networks.{network}")
    address = settings.get("ipv4_address")
    return None if address is None else str(address)


def _parse_volume(name: str, volume: Any) -> VolumeMount:
    if isinstance(volume, dict):
        source, target = volume.get("source"), volume.get("target")
    else:
        source, _, rest = str(volume).partition(":")
        target = rest.split(":")[0]
    if not source or not target or not str(target).startswith("/"):
        raise ComposeError(f"service {name}: volume {volume!r}: use SOURCE:/absolute/target")
    is_bind = str(source).startswith(("/", "."))
    if str(source).startswith("."):
        raise ComposeError(f"service {name}: volume {volume!r}: use an absolute host path")
    return VolumeMount(source=str(source), target=str(target), is_bind=is_bind)


def _parse_links(
    links: Mapping[str, Any], services: Mapping[str, Service]
) -> dict[str, LinkShaping]:
    parsed = {}
    for name, spec in links.items():
        if name not in services:
            raise ComposeError(f"{EXTENSION_KEY}.links names unknown service {name!r}")
        spec = as_mapping(spec, f"{EXTENSION_KEY}.links.{name}")
        unknown = set(spec) - {"bandwidth", "delay_ms"}
        if unknown:
            raise ComposeError(f"{EXTENSION_KEY}.links.{name}: unknown {sorted(unknown)}")
        bandwidth = spec.get("bandwidth")
        delay = spec.get("delay_ms")
        parsed[name] = LinkShaping(
            bandwidth_bits_per_s=None if bandwidth is None else parse_bandwidth(str(bandwidth)),
            delay_ms=None if delay is None else float(delay),
        )
    return parsed


_PAIR_NUMBERS = ("latency_ms", "bandwidth_mb_s")


def _parse_pair_links(extension: Mapping[str, Any], services: Mapping[str, Service]) -> LinkTable:
    """The per-pair form, checked as a cluster file's links are, naming services."""
    raw_links = extension.get("links", [])
    if not isinstance(raw_links, list):
        raise ComposeError(
            f"{EXTENSION_KEY}.links: with default_link, give links as a list of "
            "{from, to, latency_ms, bandwidth_mb_s}"
        )
    data: dict[str, Any] = {"links": [_numbers(link) for link in raw_links]}
    if "default_link" in extension:
        data["default_link"] = _numbers(extension["default_link"])
    try:
        table = parse_links(data)
    except ValueError as exc:
        raise ComposeError(f"{EXTENSION_KEY}: {exc}") from exc
    for src, dst in table.links:
        for end in (src, dst):
            if end not in services:
                raise ComposeError(
                    f"{EXTENSION_KEY}.links: link {src} -> {dst} names unknown service "
                    f"{end!r}; services are {', '.join(services)}"
                )
    return table


def _numbers(raw: Any) -> Any:
    """Interpolated values arrive as strings (`${DELAY:-2}`): numbers where they read as one."""
    if not isinstance(raw, dict):
        return raw
    out = dict(raw)
    for key in _PAIR_NUMBERS:
        value = out.get(key)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):  # else left as it is: parse_links names it
                out[key] = float(value)
    return out
