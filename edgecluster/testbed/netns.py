"""Build and tear down the testbed network: one bridge, one namespace per service.

The bridge lives in the root namespace with no address (nothing routes between
the host and the testbed; published ports are forwarded by `forward`). Each
service namespace has `lo`, an `eth0` veth on the bridge with its address, a
multicast route so mDNS reaches the other namespaces, and no default route.
IPv6 address generation is off on the root-side links so host processes do not
multicast onto the testbed. Every call runs `ip`/`tc` with an argument list.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from edgecluster.errors import EdgeClusterError
from edgecluster.testbed.topology import Endpoint

logger = logging.getLogger(__name__)

ETC_NETNS = Path("/etc/netns")
MULTICAST = "224.0.0.0/4"


class NetworkSetupError(EdgeClusterError):
    """An `ip` or `tc` command failed."""


def run(argv: list[str], *, check: bool = True) -> str:
    """stdout of `argv`; NetworkSetupError with its stderr when it fails and `check`."""
    logger.debug("running %s", argv)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise NetworkSetupError(f"`{' '.join(argv)}` failed: {done.stderr.strip()}")
    return done.stdout


def missing_tools() -> list[str]:
    return [tool for tool in ("ip", "tc") if shutil.which(tool) is None]


def list_netns() -> list[str]:
    return [line.split()[0] for line in run(["ip", "netns", "list"]).splitlines() if line]


def list_links() -> list[str]:
    names = []
    for line in run(["ip", "-o", "link", "show"]).splitlines():
        names.append(line.split(":")[1].strip().split("@")[0])
    return names


def create_bridge(name: str) -> None:
    run(["ip", "link", "add", "name", name, "type", "bridge", "mcast_snooping", "0"])
    run(["ip", "link", "set", "dev", name, "addrgenmode", "none"])
    run(["ip", "link", "set", "dev", name, "up"])


def create_endpoint(bridge: str, endpoint: Endpoint) -> None:
    """Namespace, veth pair on `bridge`, address, multicast route, shaping."""
    ns = endpoint.netns
    run(["ip", "netns", "add", ns])
    run(["ip", "link", "add", endpoint.veth, "type", "veth", "peer", "name", endpoint.peer])
    run(["ip", "link", "set", "dev", endpoint.veth, "addrgenmode", "none"])
    run(["ip", "link", "set", "dev", endpoint.peer, "netns", ns])
    run(["ip", "link", "set", "dev", endpoint.veth, "master", bridge, "up"])
    in_ns = ["ip", "-n", ns]
    run([*in_ns, "link", "set", "dev", "lo", "up"])
    run([*in_ns, "link", "set", "dev", endpoint.peer, "name", "eth0"])
    run([*in_ns, "addr", "add", f"{endpoint.address}/{endpoint.prefixlen}", "dev", "eth0"])
    run([*in_ns, "link", "set", "dev", "eth0", "up"])
    run([*in_ns, "route", "add", MULTICAST, "dev", "eth0"])
    if endpoint.bandwidth_bits_per_s is not None:
        shape(endpoint)


def shape(endpoint: Endpoint) -> None:
    """Token-bucket both directions of the service's link to its bandwidth."""
    rate = endpoint.bandwidth_bits_per_s
    assert rate is not None
    burst_bytes = max(16 * 1024, rate // 8 // 250)  # 4 ms of traffic, at least 16 KiB
    tbf = ["root", "tbf", "rate", f"{rate}bit", "burst", str(burst_bytes), "latency", "50ms"]
    run(["tc", "qdisc", "replace", "dev", endpoint.veth, *tbf])
    run(["tc", "-n", endpoint.netns, "qdisc", "replace", "dev", "eth0", *tbf])


def hosts_path(netns: str) -> Path:
    """/etc/netns/<ns>/hosts: bound over /etc/hosts for the service (and by `ip netns exec`)."""
    return ETC_NETNS / netns / "hosts"


def write_hosts(netns: str, hosts: Mapping[str, str]) -> Path:
    path = hosts_path(netns)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines += [f"{address}\t{name}" for name, address in hosts.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def remove_hosts(netns: str) -> bool:
    directory = ETC_NETNS / netns
    if not directory.exists():
        return False
    shutil.rmtree(directory)
    if ETC_NETNS.is_dir() and not any(ETC_NETNS.iterdir()):
        ETC_NETNS.rmdir()
    return True


def netns_pids(netns: str) -> list[int]:
    return [int(pid) for pid in run(["ip", "netns", "pids", netns], check=False).split()]


def delete_netns(netns: str) -> bool:
    if netns not in list_netns():
        return False
    run(["ip", "netns", "delete", netns])  # its veth end, and so the pair, goes with it
    return True


def delete_link(name: str) -> bool:
    if name not in list_links():
        return False
    try:
        run(["ip", "link", "delete", "dev", name])
    except NetworkSetupError:
        if name in list_links():
            raise
    return True  # or it went with its namespace meanwhile
