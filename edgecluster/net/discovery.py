"""mDNS discovery with python-zeroconf: `_edgecluster._tcp.local.`.

Coordinators and agents advertise themselves with TXT records (role, node id, gRPC
port, protocol version) and browse for each other. Advertising and browsing happen
only on the interfaces of the served address: a loopback cluster multicasts on
loopback alone; `0.0.0.0` means every interface.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

import psutil
from zeroconf import InterfaceChoice, IPVersion, ServiceBrowser, ServiceInfo, Zeroconf

from edgecluster import PROTOCOL_VERSION

log = logging.getLogger(__name__)

SERVICE_TYPE = "_edgecluster._tcp.local."


@dataclass(frozen=True, kw_only=True)
class Announcement:
    role: str  # "agent" | "coordinator"
    name: str
    node_id: str
    address: str  # host:port of the gRPC server
    protocol_version: int


def interfaces_for(host: str) -> InterfaceChoice | list[str]:
    """The interfaces mDNS may use for a server bound to `host`."""
    if host in ("0.0.0.0", "", "::"):
        return InterfaceChoice.All
    return [socket.gethostbyname(host)]


def advertised_ips(host: str) -> list[str]:
    """Addresses peers can reach a server bound to `host` at."""
    if host not in ("0.0.0.0", "", "::"):
        return [socket.gethostbyname(host)]
    ips = [
        a.address
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family == socket.AF_INET and not a.address.startswith("127.")
    ]
    return ips or ["127.0.0.1"]


class Discovery:
    """One zeroconf instance: advertise ourselves, report peers of a role."""

    def __init__(self, host: str) -> None:
        self._host = host
        self._zc = Zeroconf(interfaces=interfaces_for(host), ip_version=IPVersion.V4Only)
        self._infos: list[ServiceInfo] = []
        self._browsers: list[ServiceBrowser] = []
        self._lock = threading.Lock()

    def advertise(self, *, role: str, name: str, node_id: str, port: int) -> None:
        instance = f"{name}-{role}-{node_id[:8]}"
        info = ServiceInfo(
            SERVICE_TYPE,
            f"{instance}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(ip) for ip in advertised_ips(self._host)],
            port=port,
            properties={
                "role": role,
                "name": name,
                "node_id": node_id,
                "grpc_port": str(port),
                "protocol_version": str(PROTOCOL_VERSION),
            },
            server=f"{instance}.local.",
        )
        with self._lock:
            self._infos.append(info)

        def register() -> None:  # mDNS probing takes ~1.5 s: never hold up joining
            try:
                self._zc.register_service(info, allow_name_change=True)
                log.info("advertising %s %s on %s port %d", role, name, self._host, port)
            except Exception as exc:  # zeroconf closed meanwhile, or a name clash
                log.warning("could not advertise over mDNS: %s", exc)

        threading.Thread(target=register, name="mdns-register", daemon=True).start()

    def watch(self, role: str, on_found: Callable[[Announcement], None]) -> None:
        """Calls on_found (on zeroconf's thread) for each peer of `role` seen."""

        def handler(zeroconf: Zeroconf, service_type: str, name: str, state_change) -> None:  # type: ignore[no-untyped-def]
            if state_change.name not in ("Added", "Updated"):
                return
            info = zeroconf.get_service_info(service_type, name, timeout=1500)
            found = _announcement(info) if info else None
            if found is not None and found.role == role:
                on_found(found)

        with self._lock:
            self._browsers.append(ServiceBrowser(self._zc, SERVICE_TYPE, handlers=[handler]))

    def close(self) -> None:
        with self._lock:
            for browser in self._browsers:
                browser.cancel()
            for info in self._infos:
                try:
                    self._zc.unregister_service(info)
                except Exception as exc:  # shutting down: nothing to do but say so
                    log.debug("unregister failed: %s", exc)
            self._browsers.clear()
            self._infos.clear()
        self._zc.close()


def _announcement(info: ServiceInfo) -> Announcement | None:
    props = {
        k.decode(): (v.decode() if isinstance(v, bytes) else "")
        for k, v in (info.properties or {}).items()
    }
    ips = info.parsed_addresses(IPVersion.V4Only)
    if not ips or "role" not in props or "grpc_port" not in props:
        return None
    try:
        return Announcement(
            role=props["role"],
            name=props.get("name", ""),
            node_id=props.get("node_id", ""),
            address=f"{ips[0]}:{int(props['grpc_port'])}",
            protocol_version=int(props.get("protocol_version", "0")),
        )
    except ValueError:
        return None
