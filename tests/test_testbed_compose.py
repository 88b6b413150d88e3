"""Compose parsing, topology planning and link settings for the testbed: no root needed."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from edgecluster.plan.cluster_file import link_matrix, load_links
from edgecluster.testbed.cli import main
from edgecluster.testbed.compose import ComposeError, load_compose, parse_compose
from edgecluster.testbed.compose_values import interpolate, parse_bandwidth, parse_docker_bytes
from edgecluster.testbed.launch import link_environment, write_links_file
from edgecluster.testbed.topology import IFNAME_MAX, bridge_name, plan_topology

COMPOSE = """
name: demo
x-edgecluster:
  links:
    client: {bandwidth: 10mbit, delay_ms: 5}
services:
  web:
    image: ignored:latest
    command: python -m http.server 8080 --bind 0.0.0.0
    environment:
      - GREETING=${GREETING:-hello}
      - PRICE=$$5
    cpus: "0.5"
    mem_limit: 256m
    blkio_config:
      device_read_bps: [{path: /dev/vda, rate: 12mb}]
    ports: ["127.0.0.1:18080:8080/tcp"]
    networks:
      lan: {ipv4_address: 10.99.0.20}
    volumes: [web-data:/srv/data]
  client:
    command: [curl, "http://web:8080/"]
    environment: {TOKEN: "${TOKEN}", VERBOSE: true}
    depends_on:
      web: {condition: service_started}
    networks: [lan]
networks:
  lan:
    ipam:
      config: [{subnet: 10.99.0.0/24}]
"""


def _load(tmp_path: Path, text: str, **env: str):
    path = tmp_path / "compose.yaml"
    path.write_text(textwrap.dedent(text))
    return load_compose(path, env=env)


def test_parses_the_subset_we_use(tmp_path: Path) -> None:
    project = _load(tmp_path, COMPOSE, TOKEN="t0k")
    web, client = project.services["web"], project.services["client"]
    assert web.command == ("python", "-m", "http.server", "8080", "--bind", "0.0.0.0")
    assert web.environment == {"GREETING": "hello", "PRICE": "$5"}
    assert (web.cpus, web.mem_limit_bytes) == (0.5, 256 * 1024**2)
    assert web.read_bps == (("/dev/vda", 12 * 1024**2),)
    assert [(p.host_port, p.container_port) for p in web.ports] == [(18080, 8080)]
    assert web.ipv4_address == "10.99.0.20" and web.volumes[0].source == "web-data"
    assert client.command == ("curl", "http://web:8080/")
    assert client.environment == {"TOKEN": "t0k", "VERBOSE": "true"}
    assert client.depends_on == ("web",) and client.ipv4_address is None
    assert project.links["client"].bandwidth_bits_per_s == 10_000_000
    assert project.links["client"].delay_ms == 5.0
    assert project.start_order() == ["web", "client"]


def test_topology_names_fit_and_addresses_are_assigned(tmp_path: Path) -> None:
    project = _load(tmp_path, COMPOSE)
    topology = plan_topology("a-rather-long-project-name", project)
    assert len(topology.bridge) <= IFNAME_MAX
    web, client = topology.endpoint("web"), topology.endpoint("client")
    assert web.address == "10.99.0.20" and client.address == "10.99.0.2"
    assert client.netns == "ec-a-rather-long-project-name-client"
    assert all(len(e.veth) <= IFNAME_MAX and len(e.peer) <= IFNAME_MAX for e in (web, client))
    assert web.veth != client.veth and web.veth[:8] == client.veth[:8]
    assert client.bandwidth_bits_per_s == 10_000_000 and web.bandwidth_bits_per_s is None
    assert topology.hosts() == {"web": "10.99.0.20", "client": "10.99.0.2"}
    assert bridge_name("demo") == "ecb-demo"
    with pytest.raises(ValueError, match="--project"):
        bridge_name("Bad Name")


@pytest.mark.parametrize(
    ("service_yaml", "message"),
    [
        ("command: x\n    network_mode: host", "network_mode"),
        ("command: x\n    deploy: {resources: {limits: {cpus: '1'}}}", "deploy"),
        ("image: only-an-image", "no command"),
        ("command: x\n    ports: ['8000']", "HOST:CONTAINER"),
        ("command: x\n    ports: ['53:53/udp']", "HOST:CONTAINER"),
        ("command: x\n    depends_on: [nothing]", "unknown"),
        ("command: x\n    mem_limit: lots", "mem_limit"),
        ("command: x\n    networks: {other: {}}", "only"),
        ("command: x\n    blkio_config: {weight: 10}", "device_read_bps only"),
    ],
)
def test_unsupported_or_broken_keys_are_refused(
    tmp_path: Path, service_yaml: str, message: str
) -> None:
    text = f"services:\n  svc:\n    {service_yaml}\n"
    with pytest.raises(ComposeError, match=message):
        _load(tmp_path, text)


def test_dependency_cycles_and_bad_addresses_are_refused() -> None:
    cycle = {"services": {"a": {"command": "x", "depends_on": ["b"]}, "b": {"command": "x"}}}
    cycle["services"]["b"]["depends_on"] = ["a"]
    with pytest.raises(ComposeError, match="cycle"):
        parse_compose(cycle)
    outside = {"services": {"a": {"command": "x", "networks": {"default": None}}}}
    project = parse_compose(outside)
    assert str(project.subnet) == "10.77.0.0/24"
    stray = {"services": {"a": {"command": "x", "networks": {"n": {"ipv4_address": "10.1.1.1"}}}}}
    stray["networks"] = {"n": {"ipam": {"config": [{"subnet": "10.2.0.0/24"}]}}}
    with pytest.raises(ComposeError, match="outside the subnet"):
        plan_topology("p", parse_compose(stray))


def test_values() -> None:
    env = {"SET": "v", "EMPTY": ""}
    assert interpolate("${SET}-${EMPTY:-d}-${EMPTY-d}-${UNSET:-d}-$SET-$$", env) == "v-d--d-v-$"
    with pytest.raises(ComposeError, match="MUST must be set: give it"):
        interpolate({"a": ["${MUST:?give it}"]}, env)
    assert parse_docker_bytes("400m") == 400 * 1024**2
    assert parse_docker_bytes("1.5g") == int(1.5 * 1024**3)
    assert parse_docker_bytes("3GB") == 3 * 1024**3
    assert parse_docker_bytes(1024) == 1024
    assert parse_bandwidth("100mbit") == 100_000_000
    assert parse_bandwidth("1gbit") == 10**9
    assert parse_bandwidth("10mbps") == 80_000_000
    with pytest.raises(ValueError, match="100mbit"):
        parse_bandwidth("fast")


def test_cli_without_root_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert main(["status", "--project", "demo"]) == 2
    assert "needs root" in capsys.readouterr().err


PAIRS = """
x-edgecluster:
  default_link: {latency_ms: "${BASE_MS:-2}", bandwidth_mb_s: 100}
  links:
    - {from: coordinator, to: slow, latency_ms: 40, bandwidth_mb_s: 1.5}
    - {from: slow, to: fast, latency_ms: 25, bandwidth_mb_s: 12.5}
services:
  coordinator: {command: edge-coordinator serve}
  fast: {command: edge-agent join coordinator:50050 --name fast}
  slow: {command: edge-agent join coordinator:50050 --name slow}
"""


def test_per_pair_links_in_the_cluster_file_vocabulary_reach_the_coordinator(
    tmp_path: Path,
) -> None:
    project = _load(tmp_path, PAIRS, BASE_MS="3")
    assert project.links == {}  # no tc shaping: the sessions emulate each pair
    table = project.pair_links
    assert table is not None and table.default_link is not None
    assert table.default_link.latency_ms == 3.0  # interpolated strings read as numbers
    assert table.link("slow", "coordinator").bandwidth_mb_s == 1.5
    state_dir = tmp_path / "state"
    written = write_links_file(project, state_dir)
    assert written == state_dir / "links.json"
    delays, bandwidths = link_matrix(load_links(written), ["coordinator", "fast", "slow"])
    assert delays == [[0, 3, 40], [3, 0, 25], [40, 25, 0]]
    assert bandwidths[2] == [1.5, 12.5, 0]
    for service in project.services.values():  # each service is told where the file is
        assert link_environment(service, project, written) == {"EDGE_CLUSTER_FILE": str(written)}
    assert plan_topology("p", project).endpoint("slow").bandwidth_bits_per_s is None
    legacy = _load(tmp_path, COMPOSE)
    assert write_links_file(legacy, state_dir / "other") is None
    client = legacy.services["client"]
    assert link_environment(client, legacy) == {"EDGE_LINK_DELAY_MS": "5"}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("to: fast", "to: nowhere"), "link slow -> nowhere names unknown service 'nowhere'"),
        (("latency_ms: 40", "latency_ms: -1"), "latency_ms must be a finite number >= 0"),
        (("bandwidth_mb_s: 1.5", "bandwidth_mb_s: fast"), "bandwidth_mb_s must be a number"),
        (("latency_ms: 25, ", ""), "missing 'latency_ms'"),
        (("to: fast", "to: slow"), "joins a device to itself"),
        (("  links:\n", "  linx: 1\n  links:\n"), r"unknown key\(s\) \['linx'\]"),
        (("default_link: {", "default_link: {jitter_ms: 1, "), "unknown key.*'jitter_ms'"),
    ],
)
def test_bad_per_pair_links_are_refused_naming_the_problem(
    tmp_path: Path, edit: tuple[str, str], message: str
) -> None:
    with pytest.raises(ComposeError, match=message):
        _load(tmp_path, PAIRS.replace(*edit, 1))


def test_a_hand_set_cluster_file_must_agree(tmp_path: Path) -> None:
    text = PAIRS.replace(
        "{command: edge-coordinator serve}",
        "{command: x, environment: {EDGE_CLUSTER_FILE: /elsewhere.json}}",
    )
    project = _load(tmp_path, text)
    with pytest.raises(ComposeError, match="EDGE_CLUSTER_FILE=/elsewhere.json disagrees"):
        link_environment(project.services["coordinator"], project, tmp_path / "links.json")
