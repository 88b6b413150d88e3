"""Names and addresses of a testbed, computed from the project name and compose file alone.

Pure: nothing here touches the system. Every name is derived from the project
(and service) name, so `down` can find what `up` created even after a crash.
Interface names stay within Linux's 15 characters by using short hashes.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass

from edgecluster.testbed.compose import ComposeError, ComposeProject

IFNAME_MAX = 15
_PROJECT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")


@dataclass(frozen=True, kw_only=True)
class Endpoint:
    """One service's place on the bridge: its namespace, veth pair and address."""

    service: str
    netns: str
    veth: str  # host side, attached to the bridge
    peer: str  # temporary name of the namespace side, renamed to eth0 there
    address: str
    prefixlen: int
    bandwidth_bits_per_s: int | None = None


@dataclass(frozen=True, kw_only=True)
class Topology:
    project: str
    bridge: str
    subnet: str
    endpoints: tuple[Endpoint, ...]

    def hosts(self) -> dict[str, str]:
        """Service name -> address, for each namespace's /etc/hosts."""
        return {endpoint.service: endpoint.address for endpoint in self.endpoints}

    def endpoint(self, service: str) -> Endpoint:
        return next(endpoint for endpoint in self.endpoints if endpoint.service == service)


def check_project(project: str) -> str:
    if not _PROJECT_RE.match(project):
        raise ValueError(
            f"project name {project!r}: use 1-40 lowercase letters, digits, '-' or '_', "
            "starting with a letter or digit (pass --project NAME)"
        )
    return project


def _short_hash(text: str, length: int) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:length]


def bridge_name(project: str) -> str:
    name = f"ecb-{check_project(project)}"
    return name if len(name) <= IFNAME_MAX else f"ecb-{_short_hash(project, 11)}"


def veth_prefix(project: str) -> str:
    return f"ecv{_short_hash(check_project(project), 5)}"


def veth_name(project: str, service: str) -> str:
    return f"{veth_prefix(project)}{_short_hash(service, 6)}"


def netns_name(project: str, service: str) -> str:
    """Namespace (and cgroup) name of a service: ec-<project>-<service>."""
    return f"ec-{check_project(project)}-{service}"


def plan_topology(project: str, compose: ComposeProject) -> Topology:
    """Addresses from the compose file; services without one get the next free address."""
    subnet = compose.subnet
    taken = {subnet.network_address, subnet.broadcast_address, subnet.network_address + 1}
    addresses: dict[str, ipaddress.IPv4Address] = {}
    for service in compose.services.values():
        if service.ipv4_address is not None:
            addresses[service.name] = _check_address(service.name, service.ipv4_address, subnet)
            if addresses[service.name] in taken:
                raise ComposeError(
                    f"service {service.name}: {service.ipv4_address} is taken (network, "
                    "broadcast, gateway .1 or another service); pick another"
                )
            taken.add(addresses[service.name])
    free = (host for host in subnet.hosts() if host not in taken)
    for name in compose.services:
        if name not in addresses:
            addresses[name] = next(free)
    endpoints = tuple(
        _endpoint(project, compose, name, addresses[name]) for name in compose.services
    )
    return Topology(
        project=project, bridge=bridge_name(project), subnet=str(subnet), endpoints=endpoints
    )


def _check_address(
    service: str, address: str, subnet: ipaddress.IPv4Network
) -> ipaddress.IPv4Address:
    try:
        parsed = ipaddress.IPv4Address(address)
    except ValueError as exc:
        raise ComposeError(f"service {service}: bad ipv4_address: {exc}") from exc
    if parsed not in subnet:
        raise ComposeError(f"service {service}: {address} is outside the subnet {subnet}")
    return parsed


def _endpoint(
    project: str, compose: ComposeProject, service: str, address: ipaddress.IPv4Address
) -> Endpoint:
    veth = veth_name(project, service)
    link = compose.links.get(service)
    return Endpoint(
        service=service,
        netns=netns_name(project, service),
        veth=veth,
        peer="ecp" + veth[3:],
        address=str(address),
        prefixlen=compose.subnet.prefixlen,
        bandwidth_bits_per_s=link.bandwidth_bits_per_s if link else None,
    )
