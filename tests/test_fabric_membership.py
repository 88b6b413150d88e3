"""Membership across real processes on 127.0.0.1: join, status, SIGKILL, SIGTERM, rejoin, tokens."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from edgecluster.net.grpc_util import open_channel
from edgecluster.net.pb import edgecluster_pb2 as pb
from edgecluster.net.pb import edgecluster_pb2_grpc as pb_grpc
from tests.procs import (
    MEMBER_FIELDS,
    Coordinator,
    Proc,
    ProcessPool,
    free_port,
    group_members,
    module_procs,  # noqa: F401  (fixture)
    procs,  # noqa: F401  (fixture)
    unique_name,
    wait_until,
)

# Issue 2 asks for "listed within 2 s of starting": benchmarks/join_time.py measures
# it. These bounds are generous so a loaded 2-core machine cannot fail them.
LISTED_WITHIN_S = 12.0
PROFILED_WITHIN_S = 30.0
DEAD_WITHIN_S = 10.0  # 2.5 s heartbeat timeout (unit-tested with a fake clock) + load
LEFT_WITHIN_S = 5.0
# What stays put between two reads (memory available, last seen, runtime figures change
# with every heartbeat).
STABLE_FIELDS = MEMBER_FIELDS - {"memory_available_bytes"}


@pytest.fixture(scope="module")
def coord(module_procs: ProcessPool) -> Coordinator:  # noqa: F811
    return module_procs.coordinator()


def _agent_status(address: str, token: str) -> pb.AgentStatus:
    with open_channel(address, token) as channel:
        return pb_grpc.AgentStub(channel).Status(pb.Empty(), timeout=5)


def _time_to_listed(coord: Coordinator, pool: ProcessPool) -> tuple[float, str, dict, Proc]:
    """Seconds from Popen of a new agent to its being listed alive, and what it was."""
    name = unique_name("listed")
    agent = pool.agent(coord.grpc_address, name=name)
    member = coord.wait_member(name, "alive", timeout_s=15)
    return time.monotonic() - agent.started_at, name, member, agent


def test_an_agent_is_listed_at_once_then_with_its_measured_profile(
    coord: Coordinator,
    module_procs: ProcessPool,  # noqa: F811
) -> None:
    # The agent joins before it imports torch (benchmarks/join_time.py measures how
    # fast); the bound here only catches an agent that never joins early.
    elapsed, name, listed, agent = _time_to_listed(coord, module_procs)
    assert elapsed <= LISTED_WITHIN_S, (
        f"listed {elapsed:.2f} s after its process started (bar {LISTED_WITHIN_S} s, "
        f"load average {os.getloadavg()[0]:.1f})\n{agent.describe()}"
    )
    assert listed["cpu_count"] >= 1 and listed["memory_total_bytes"] > 0

    def measured() -> dict | None:
        m = coord.member(name)
        return m if m is not None and m["matmul_gflops"] > 0 else None

    member = wait_until(measured, PROFILED_WITHIN_S, f"{name}'s measured profile")
    assert set(member) >= MEMBER_FIELDS, MEMBER_FIELDS - set(member)
    node_id = (module_procs.root / "agents" / name / "node_id").read_text().strip()
    assert member["id"] == node_id and re.fullmatch(r"[0-9a-f]{32}", node_id)
    assert re.fullmatch(r"127\.0\.0\.1:\d+", member["address"]), member["address"]
    assert member["cpu_count"] >= 1
    assert 0 < member["memory_available_bytes"] <= member["memory_total_bytes"]
    assert member["disk_read_bytes_per_s"] > 0 and member["matmul_gflops"] > 0
    assert isinstance(member["accelerator"], str) and member["accelerator"]
    # The listed address is the agent's own gRPC server.
    assert _agent_status(member["address"], coord.token).node_id == node_id


def test_status_json_and_http_list_the_same_agents(
    coord: Coordinator,
    module_procs: ProcessPool,  # noqa: F811
) -> None:
    name = unique_name("both")
    module_procs.agent(coord.grpc_address, name=name)
    coord.wait_member(name, "alive", timeout_s=15)

    def all_measured() -> bool:  # agents join before measuring: compare settled profiles
        agents = (coord.cluster() or {}).get("agents", [])
        return all(a["matmul_gflops"] > 0 for a in agents if a["state"] == "alive")

    wait_until(all_measured, 30, "every agent's measured profile")
    result = module_procs.status(coord, "--json")
    assert result.returncode == 0, result.stderr
    from_status = json.loads(result.stdout)["agents"]
    from_http = coord.cluster()["agents"]  # type: ignore[index]

    def stable(agents: list[dict]) -> list[dict]:
        return [{k: a[k] for k in STABLE_FIELDS} for a in agents]

    assert stable(from_status) == stable(from_http)
    assert [set(a) for a in from_status] == [set(a) for a in from_http]
    assert name in {a["name"] for a in from_status}
    assert all(set(a) >= MEMBER_FIELDS for a in from_status)

    table = module_procs.status(coord)
    assert table.returncode == 0, table.stderr
    assert "NAME" in table.stdout and name in table.stdout and "alive" in table.stdout


@pytest.mark.slow  # about 10 s on two busy cores
def test_sigkill_is_dead_within_5_s_and_a_restart_rejoins_as_the_same_node(
    coord: Coordinator,
    module_procs: ProcessPool,  # noqa: F811
    tmp_path: Path,
) -> None:
    name, data_dir = unique_name("killed"), tmp_path / "killed-data"
    first = module_procs.agent(coord.grpc_address, name=name, data_dir=data_dir)
    node_id = coord.wait_member(name, "alive", timeout_s=15)["id"]

    first.send(signal.SIGKILL)
    killed_at = time.monotonic()
    coord.wait_member(name, "dead", timeout_s=DEAD_WITHIN_S + 5)
    assert time.monotonic() - killed_at <= DEAD_WITHIN_S
    first.wait(5)

    module_procs.agent(coord.grpc_address, name=name, data_dir=data_dir)
    again = coord.wait_member(name, "alive", timeout_s=15)
    assert again["id"] == node_id
    assert [a["id"] for a in coord.cluster()["agents"]].count(node_id) == 1  # type: ignore[index]
    time.sleep(1.2)  # heartbeats (every 0.5 s) flow again, not just the join
    member = coord.member(name)
    assert member is not None and member["state"] == "alive"
    assert member["last_seen_s_ago"] < 2.0, member  # heartbeats every 0.5 s; load margin


def test_sigterm_leaves_at_once_and_exits_zero(
    coord: Coordinator,
    module_procs: ProcessPool,  # noqa: F811
) -> None:
    name = unique_name("leaver")
    agent = module_procs.agent(coord.grpc_address, name=name)
    coord.wait_member(name, "alive", timeout_s=15)
    agent.send(signal.SIGTERM)
    sent_at = time.monotonic()
    coord.wait_member(name, "left", timeout_s=LEFT_WITHIN_S + 5)
    assert time.monotonic() - sent_at <= LEFT_WITHIN_S
    assert agent.wait(10) == 0
    assert "left the cluster" in agent.stderr()


def test_a_wrong_token_makes_the_agent_exit_non_zero_promptly(
    coord: Coordinator,
    module_procs: ProcessPool,  # noqa: F811
) -> None:
    name = unique_name("intruder")
    agent = module_procs.agent(coord.grpc_address, name=name, token="not-the-token")
    code = agent.wait(30)
    assert time.monotonic() - agent.started_at <= 30
    assert code == 2  # the agent's documented exit code for a refused token
    assert "authentication failed" in agent.stderr(), agent.stderr()
    assert coord.member(name) is None


def test_status_with_a_wrong_token_fails_clearly(
    coord: Coordinator,
    module_procs: ProcessPool,  # noqa: F811
) -> None:
    result = module_procs.status(coord, "--json", token="not-the-token")
    assert result.returncode != 0
    assert result.stdout == ""
    assert "UNAUTHENTICATED" in result.stderr and "authentication failed" in result.stderr
    assert "Traceback" not in result.stderr

    nobody = module_procs.cli(
        "edge-coordinator", "status", "--coordinator", f"127.0.0.1:{free_port()}", "--token", "t"
    )
    assert nobody.returncode != 0 and "UNAVAILABLE" in nobody.stderr
    assert "Traceback" not in nobody.stderr


def test_a_coordinator_without_token_prints_one_and_a_join_command(
    procs: ProcessPool,  # noqa: F811
) -> None:
    coord = procs.coordinator(token=None)
    out = wait_until(lambda: "join a device" in coord.stdout() and coord.stdout(), 30, "banner")
    token = re.search(r"generated cluster token: (\S+)", out)
    assert token, out
    join = re.search(r"edge-agent join (\S+) --token (\S+)", out)
    assert join, out
    assert join.group(1) == coord.grpc_address and join.group(2) == token.group(1)
    coord.token = token.group(1)
    assert len(coord.token) >= 24
    # The printed token is the cluster's: status works with it, not without.
    assert procs.status(coord, "--json").returncode == 0
    assert procs.status(coord, "--json", token="guess").returncode != 0
    # ... and the printed command line joins.
    name = unique_name("printed")
    procs.agent(join.group(1), token=join.group(2), name=name)
    coord.wait_member(name, "alive", timeout_s=15)


@pytest.mark.slow  # about 10 s on two busy cores
def test_local_agents_appear_and_stop_with_the_coordinator(
    procs: ProcessPool,  # noqa: F811
) -> None:
    coord = procs.coordinator("--local", "2")

    def both_alive() -> list[dict] | None:
        agents = (coord.cluster() or {}).get("agents", [])
        states = sorted((a["name"], a["state"]) for a in agents)
        return agents if states == [("local-0", "alive"), ("local-1", "alive")] else None

    agents = wait_until(both_alive, 20, "two local agents")
    assert len({a["id"] for a in agents}) == 2
    children = [pid for pid in group_members(coord.pid) if pid != coord.pid]
    assert len(children) >= 2, children

    coord.send(signal.SIGTERM)
    assert coord.wait(15) == 0
    wait_until(lambda: group_members(coord.pid) == [], 15, "the local agents to exit", 0.1)


def test_peers_invites_an_agent_that_knows_no_coordinator(
    procs: ProcessPool,  # noqa: F811
) -> None:
    agent_port = free_port()
    name = unique_name("invited")
    agent = procs.agent(None, "--port", str(agent_port), name=name)
    coord = procs.coordinator("--peers", f"127.0.0.1:{agent_port}")
    member = coord.wait_member(name, "alive", timeout_s=15)
    assert member["address"] == f"127.0.0.1:{agent_port}"
    assert agent.running()
