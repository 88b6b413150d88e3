"""mDNS discovery on loopback: an agent given no coordinator address finds one and is listed."""

from __future__ import annotations

import time

from tests.procs import ProcessPool, procs, unique_name  # noqa: F401  (fixture)

FOUND_WITHIN_S = 15.0  # mDNS probing alone takes about 1.4 s; margin for a loaded box


def test_an_agent_finds_the_coordinator_over_mdns(procs: ProcessPool) -> None:  # noqa: F811
    coord = procs.coordinator(mdns=True)
    name = unique_name("mdns")
    agent = procs.agent(None, name=name, mdns=True)
    member = coord.wait_member(name, "alive", timeout_s=FOUND_WITHIN_S + 10)
    elapsed = time.monotonic() - agent.started_at
    assert elapsed <= FOUND_WITHIN_S, f"found after {elapsed:.2f} s\n{agent.describe()}"
    assert member["address"].startswith("127.0.0.1:")
    assert "waiting for a coordinator (over mDNS" in agent.stderr()
