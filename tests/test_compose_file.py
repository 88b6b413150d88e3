"""docker/compose.yaml is a valid Compose file and describes the cluster we rely on."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgecluster.testbed.compose import load_compose
from edgecluster.testbed.compose_values import parse_docker_bytes

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker" / "compose.yaml"
SPEC = REPO.parent / "shared" / "data" / "compose-spec.json"
COORDINATOR = "coordinator:50050"


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _agents(raw: dict[str, Any]) -> dict[str, Any]:
    return {name: spec for name, spec in raw["services"].items() if name.startswith("agent")}


def test_matches_the_compose_specification(raw: dict[str, Any]) -> None:
    if not SPEC.exists():
        pytest.skip(f"Compose Specification schema not found at {SPEC}")
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft7Validator(json.loads(SPEC.read_text()))
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(raw)
    ]
    assert errors == []
    broken = copy.deepcopy(raw)
    broken["services"]["coordinator"]["cpu_count_typo"] = 1
    assert not validator.is_valid(broken), "the schema should reject unknown service keys"


def test_four_unequal_agents(raw: dict[str, Any]) -> None:
    agents = _agents(raw)
    assert len(agents) == 4
    profiles = {(float(a["cpus"]), parse_docker_bytes(a["mem_limit"])) for a in agents.values()}
    assert len(profiles) == 4, "every agent should be a different device"
    rates = [a["blkio_config"]["device_read_bps"][0]["rate"] for a in agents.values()]
    assert len({parse_docker_bytes(rate) for rate in rates}) == 4


def test_tiny_agent_streams_below_its_memory_cap(raw: dict[str, Any]) -> None:
    tiny = raw["services"]["agent-tiny"]
    command = tiny["command"].split()
    memory_limit = command[command.index("--memory-limit") + 1]
    assert memory_limit == "380MiB"
    assert parse_docker_bytes(tiny["mem_limit"]) > 380 * 1024**2
    assert float(tiny["cpus"]) == min(float(a["cpus"]) for a in _agents(raw).values())


def test_roles_wiring(raw: dict[str, Any]) -> None:
    services = raw["services"]
    coordinator = services["coordinator"]
    assert "8000:8000" in coordinator["ports"]
    assert "--host 0.0.0.0" in coordinator["command"]
    assert "--http-host 0.0.0.0" in coordinator["command"]  # published, so with a key:
    assert "${EDGE_API_KEY:-" in coordinator["environment"]["EDGE_API_KEY"]
    assert "--min-agents 4" in coordinator["command"]
    assert len(raw["networks"]) == 1
    network = next(iter(raw["networks"]))
    for name, agent in _agents(raw).items():
        command = agent["command"].split()
        assert command[:3] == ["edge-agent", "join", COORDINATOR], name
        assert "--host" in command and "0.0.0.0" in command, name
        assert command[command.index("--name") + 1] == name
        assert "${EDGE_TOKEN:-" in agent["environment"]["EDGE_TOKEN"], name
        assert list(agent["networks"]) == [network], name
    assert "${EDGE_TOKEN:-" in coordinator["environment"]["EDGE_TOKEN"]


def test_testbed_reads_it() -> None:
    project = load_compose(COMPOSE, env={"EDGE_TOKEN": "secret"})
    assert project.name == "edgecluster"
    assert str(project.subnet) == "10.77.0.0/24"
    assert project.start_order()[0] == "coordinator"
    tiny = project.services["agent-tiny"]
    assert tiny.environment["EDGE_TOKEN"] == "secret"
    assert tiny.environment["EDGE_LINK_DELAY_MS"] == "2"
    assert tiny.mem_limit_bytes == 400 * 1024**2
    assert tiny.read_bps == (("/dev/sda", 20 * 1024**2),)
    assert project.links["agent-tiny"].bandwidth_bits_per_s == 100_000_000
    assert project.services["coordinator"].ports[0].host_port == 8000
    assert project.services["agent-mid-a"].mem_limit_bytes == int(1.5 * 1024**3)
