"""The testbed end to end with plain Python services (root, cgroup v1, network namespaces).

A web service and a client that fetches from it by name run in their own
namespaces and emulated devices; the web port is published on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from edgecluster.device import block, cgroup_v1
from edgecluster.plan.cluster_file import link_matrix, parse_links
from edgecluster.testbed import netns, processes, runner
from edgecluster.testbed.cli import main
from edgecluster.testbed.compose import ComposeProject, load_compose
from edgecluster.testbed.topology import bridge_name, veth_prefix

REASON = runner.missing_requirements()
pytestmark = [pytest.mark.root, pytest.mark.skipif(REASON is not None, reason=REASON or "")]
PROJECT = f"ectest{os.getpid()}"

CLIENT = """
import os, time, urllib.request
for _ in range(200):
    try:
        body = urllib.request.urlopen("http://web:8080/hello.txt", timeout=2).read().decode()
        break
    except OSError:
        time.sleep(0.05)
open(os.path.join(os.environ["OUT_DIR"], "ok"), "w").write(body)
cgroups = dict(line.split(":")[1:] for line in open("/proc/self/cgroup").read().split())
limit = open(f"/sys/fs/cgroup/memory{cgroups['memory']}/memory.limit_in_bytes").read().strip()
delay = os.environ.get("EDGE_LINK_DELAY_MS")
print("fetched", body, "delay", delay, "sees its memory limit", limit, flush=True)
import socket
beacon = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(300):  # the way mDNS announces: to 224.0.0.251:5353 on the link
    beacon.sendto(b"edgecluster-beacon", ("224.0.0.251", 5353))
    time.sleep(0.05)
time.sleep(600)
"""
LISTENER = """
import socket, struct
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("", 5353))
group = struct.pack("4s4s", socket.inet_aton("224.0.0.251"), socket.inet_aton("0.0.0.0"))
sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, group)
data, sender = sock.recvfrom(100)
print("heard", data.decode(), "from", sender[0], flush=True)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _disk_path(path: Path) -> str:
    major, minor = block.disk_holding(path)
    uevent = Path(f"/sys/dev/block/{major}:{minor}/uevent").read_text()
    return "/dev/" + dict(line.split("=", 1) for line in uevent.split())["DEVNAME"]


@pytest.fixture
def compose(tmp_path: Path) -> tuple[ComposeProject, int, Path]:
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "hello.txt").write_text("hello from web")
    mount_target = tmp_path / "not-yet" / "out"
    port = _free_port()
    spec = f"""
    x-edgecluster:
      links:
        client: {{bandwidth: 50mbit, delay_ms: 3}}
    services:
      web:
        command: [python, -m, http.server, "8080", --bind, 0.0.0.0, --directory, {tmp_path}/www]
        cpus: 0.5
        mem_limit: 96m
        blkio_config:
          device_read_bps: [{{path: {_disk_path(tmp_path)}, rate: 50mb}}]
        ports: ["{port}:8080"]
        networks: {{lan: {{ipv4_address: 10.77.50.10}}}}
      client:
        command: [python, -c, {json.dumps(CLIENT)}]
        environment: {{OUT_DIR: {mount_target}}}
        cpus: 0.25
        mem_limit: 64m
        depends_on: [web]
        volumes: ["client-out:{mount_target}"]
        networks: [lan]
      listener:
        command: [python, -c, {json.dumps(LISTENER)}]
        networks: [lan]
    networks:
      lan:
        ipam: {{config: [{{subnet: 10.77.50.0/24}}]}}
    """
    path = tmp_path / "compose.yaml"
    path.write_text(textwrap.dedent(spec))
    return load_compose(path), port, mount_target


def _wait_for(predicate, timeout_s: float = 15.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def _nothing_left(project: ComposeProject, state_dir: Path, pids: list[int]) -> None:
    names = [f"ec-{PROJECT}-{name}" for name in ("web", "client", "listener")]
    assert not set(names) & set(netns.list_netns())
    links = netns.list_links()
    assert bridge_name(PROJECT) not in links
    assert not [link for link in links if link.startswith(veth_prefix(PROJECT))]
    for name in names:
        assert not any(cgroup_v1.group_path(c, name).exists() for c in cgroup_v1.CONTROLLERS)
        assert not (netns.ETC_NETNS / name).exists()
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists() and _not_zombie(pid)]
    assert runner.find_leftovers(PROJECT, state_dir, project) == []


def _not_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_up_status_down(compose: tuple[ComposeProject, int, Path], tmp_path: Path) -> None:
    project, port, mount_target = compose
    state_dir = tmp_path / "state"
    current = runner.up(project, project=PROJECT, state_dir=state_dir)
    pids = [s.process.pid for s in current.services if s.process]
    pids += [current.supervisor.pid] if current.supervisor else []
    try:
        _check_network(current)
        _check_limits(project)
        _check_client_reached_web_by_name(state_dir, mount_target)
        _check_multicast_crosses_namespaces(state_dir, current.service("client").address)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/hello.txt", timeout=5).read()
        assert body == b"hello from web"
        assert _wait_for(lambda: not _alive(state_dir)["listener"])  # it heard, then exited
        assert _alive(state_dir) == {"web": True, "client": True, "listener": False}
        with pytest.raises(runner.TestbedError, match="not clean"):
            runner.up(project, project=PROJECT, state_dir=state_dir)
    finally:
        removed = runner.down(project=PROJECT, state_dir=state_dir, compose=project, grace_s=2)
    assert f"netns ec-{PROJECT}-web" in removed
    _nothing_left(project, state_dir, pids)
    assert not mount_target.parent.exists()  # both created mount point directories are gone
    assert (state_dir / "volumes" / "client-out" / "ok").exists()  # volumes survive down
    assert runner.down(project=PROJECT, state_dir=state_dir, compose=project) == []


def _alive(state_dir: Path) -> dict[str, bool]:
    return {service.name: service.alive for service in runner.status(state_dir)[1]}


def _check_network(current: runner.TestbedState) -> None:
    assert {f"ec-{PROJECT}-web", f"ec-{PROJECT}-client"} <= set(netns.list_netns())
    for service in current.services:
        addr = netns.run(["ip", "-n", service.netns, "-4", "-o", "addr", "show", "dev", "eth0"])
        assert f"{service.address}/24" in addr
        veth = netns.run(["ip", "-o", "link", "show", "dev", service.veth])
        assert f"master {current.bridge}" in veth
    assert current.bridge in netns.list_links()
    shaped = netns.run(["tc", "qdisc", "show", "dev", current.service("client").veth])
    assert "tbf" in shaped and "50Mbit" in shaped


def _check_limits(project: ComposeProject) -> None:
    for name in ("web", "client"):
        service = project.services[name]
        cgroup = f"ec-{PROJECT}-{name}"
        memory = cgroup_v1.group_path("memory", cgroup)
        assert int(cgroup_v1.read_value(memory, "memory.limit_in_bytes")) == service.mem_limit_bytes
        quota = int(cgroup_v1.read_value(cgroup_v1.group_path("cpu", cgroup), "cpu.cfs_quota_us"))
        assert quota == round((service.cpus or 0) * 100_000)
    blkio = cgroup_v1.group_path("blkio", f"ec-{PROJECT}-web")
    assert cgroup_v1.read_value(blkio, "blkio.throttle.read_bps_device").endswith(str(50 * 1024**2))


def _check_client_reached_web_by_name(state_dir: Path, mount_target: Path) -> None:
    log = state_dir / "logs" / "client.log"
    assert _wait_for(lambda: "fetched hello" in (log.read_text() if log.exists() else "")), (
        log.read_text() if log.exists() else "no client log"
    )
    expected = f"fetched hello from web delay 3 sees its memory limit {64 * 1024**2}"
    assert expected in log.read_text()
    assert mount_target.is_dir() and not any(mount_target.iterdir())  # written in the volume


def _check_multicast_crosses_namespaces(state_dir: Path, sender: str) -> None:
    log = state_dir / "logs" / "listener.log"
    assert _wait_for(lambda: "heard" in (log.read_text() if log.exists() else "")), (
        log.read_text() if log.exists() else "no listener log"
    )
    assert f"heard edgecluster-beacon from {sender}" in log.read_text()


def test_failed_up_removes_what_it_created(
    compose: tuple[ComposeProject, int, Path], tmp_path: Path
) -> None:
    project, port, _ = compose
    with (
        socket.create_server(("127.0.0.1", port)),  # the published port is taken
        pytest.raises(runner.TestbedError, match=f"cannot publish 127.0.0.1:{port}"),
    ):
        runner.up(project, project=PROJECT, state_dir=tmp_path / "state")
    _nothing_left(project, tmp_path / "state", [])


def test_half_torn_testbed_is_refused_until_down(
    compose: tuple[ComposeProject, int, Path], tmp_path: Path
) -> None:
    project, _, _ = compose
    state_dir = tmp_path / "state"
    stray = f"ec-{PROJECT}-web"
    subprocess.run(["ip", "netns", "add", stray], check=True)
    cgroup_v1.create_group("memory", stray)
    try:
        with pytest.raises(runner.TestbedError, match=f"netns {stray}.*cgroup memory"):
            runner.up(project, project=PROJECT, state_dir=state_dir)
    finally:
        removed = runner.down(project=PROJECT, state_dir=state_dir, compose=project)
    assert f"netns {stray}" in removed and f"cgroup {stray}" in removed
    _nothing_left(project, state_dir, [])


def test_restart_runs_the_same_command_in_the_same_namespace_and_cgroup(
    compose: tuple[ComposeProject, int, Path], tmp_path: Path
) -> None:
    project, port, _ = compose
    state_dir = tmp_path / "state"
    with pytest.raises(runner.TestbedError, match="not up"):
        runner.restart(project, project=PROJECT, state_dir=state_dir, service="web")
    old = runner.up(project, project=PROJECT, state_dir=state_dir).service("web")
    try:
        with pytest.raises(runner.TestbedError, match="no service 'nope'"):
            runner.restart(project, project=PROJECT, state_dir=state_dir, service="nope")
        argv = ["--project", PROJECT, "--state-dir", str(state_dir), "web"]
        assert main(["restart", "-f", str(tmp_path / "compose.yaml"), *argv]) == 0
        new = runner.status(state_dir)[0]
        assert new is not None and old.process is not None
        record = new.service("web")
        assert record.process is not None and record.process.pid != old.process.pid
        assert not processes.is_alive(old.process)
        assert (record.argv, record.netns, record.cgroup) == (old.argv, old.netns, old.cgroup)
        assert _wait_for(lambda: _serves_hello(port))  # it has entered its namespace by now
        pid = str(record.process.pid)
        assert netns.run(["ip", "netns", "identify", pid]).strip() == old.netns
        cgroups = Path(f"/proc/{pid}/cgroup").read_text()
        assert f"memory:/{cgroup_v1.GROUP_PARENT}/{old.cgroup}\n" in cgroups
        assert "restarting web" in Path(record.log).read_text()
    finally:
        runner.down(project=PROJECT, state_dir=state_dir, compose=project, grace_s=2)
    _nothing_left(project, state_dir, [])


def _serves_hello(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/hello.txt", timeout=2) as reply:
            return bool(reply.read() == b"hello from web")
    except OSError:
        return False


def test_cli_status_and_down_without_state(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    argv = ["--project", PROJECT, "--state-dir", str(tmp_path / "none")]
    assert main(["status", *argv]) == 1
    assert main(["down", *argv]) == 0
    assert "nothing to remove" in capsys.readouterr().out


def test_cli_help_runs_as_a_module() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "edgecluster.testbed.cli", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "up" in done.stdout
    assert processes.resolve_program("python").startswith(str(Path(sys.executable).parent))


READ_LINKS = """
import json, os, time
print("links", json.dumps(json.load(open(os.environ["EDGE_CLUSTER_FILE"]))), flush=True)
time.sleep(600)
"""


def test_per_pair_links_reach_the_services_in_their_namespaces(tmp_path: Path) -> None:
    """x-edgecluster's per-pair links: written where every service can read them, named
    by EDGE_CLUSTER_FILE, no tc shaping; `down` removes the file."""
    spec = {
        "x-edgecluster": {
            "default_link": {"latency_ms": 1, "bandwidth_mb_s": 100},
            "links": [{"from": "a", "to": "b", "latency_ms": 30, "bandwidth_mb_s": 2.5}],
        },
        "services": {name: {"command": ["python", "-c", READ_LINKS]} for name in ("a", "b")},
        "networks": {"lan": {"ipam": {"config": [{"subnet": "10.77.51.0/24"}]}}},
    }
    path = tmp_path / "compose.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    project, state_dir = load_compose(path), tmp_path / "state"
    current = runner.up(project, project=PROJECT, state_dir=state_dir)
    try:
        log = state_dir / "logs" / "b.log"
        assert _wait_for(lambda: "links" in (log.read_text() if log.exists() else ""), 60), (
            log.read_text() if log.exists() else "no log"
        )
        seen = json.loads(log.read_text().split("links ", 1)[1].splitlines()[0])
        delays, bandwidths = link_matrix(parse_links(seen), ["a", "b"])
        assert (delays, bandwidths) == ([[0, 30], [30, 0]], [[0, 2.5], [2.5, 0]])
        shaped = netns.run(["tc", "qdisc", "show", "dev", current.service("b").veth])
        assert "tbf" not in shaped
    finally:
        removed = runner.down(project=PROJECT, state_dir=state_dir, compose=project, grace_s=2)
    assert f"links {state_dir / 'links.json'}" in removed
    assert not (state_dir / "links.json").exists()
