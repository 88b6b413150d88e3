"""Operations: restart delays of `--local` agents, and a taken port as one clear line."""

from __future__ import annotations

import socket
import subprocess
import sys

from edgecluster.runtime.local_agents import RESTART_MAX_DELAY_S, restart_delay_s
from edgecluster.runtime.ports import first_taken, port_taken


def test_restart_delays_double_then_stay_slow_while_it_keeps_dying() -> None:
    assert restart_delay_s(0) == 1
    assert [restart_delay_s(n) for n in range(1, 6)] == [1, 2, 4, 8, RESTART_MAX_DELAY_S]
    assert restart_delay_s(12) == RESTART_MAX_DELAY_S


def test_a_listening_port_is_taken_and_named_with_its_flag() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert port_taken("127.0.0.1", port)
        message = first_taken(
            [
                ("127.0.0.1", 0, "--data-port", "--data-port"),
                ("127.0.0.1", port, "--grpc-port", "--grpc-port, or GRPC_PORT=..."),
            ]
        )
    assert (
        message
        == f"port {port} (--grpc-port) is taken; pick another with --grpc-port, or GRPC_PORT=..."
    )
    assert not port_taken("127.0.0.1", port)  # released: free again
    assert first_taken([("127.0.0.1", 0, "--port", "--port")]) is None


def _run(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_a_coordinator_on_a_taken_port_says_so_in_one_line_before_anything_else() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        http = _run(
            "coordinator.cli", "serve", "--no-mdns", "--port", str(port), "--grpc-port", "0"
        )
        grpc = _run(
            "coordinator.cli", "serve", "--no-mdns", "--port", "0", "--grpc-port", str(port)
        )
    assert http.returncode == 2 and http.stdout == ""
    assert http.stderr.strip().splitlines() == [
        f"edge-coordinator: port {port} (--port) is taken; "
        "pick another with --port, or PORT=... for make serve"
    ]
    assert grpc.returncode == 2 and grpc.stdout == ""
    assert "(--grpc-port) is taken" in grpc.stderr and "GRPC_PORT=" in grpc.stderr
    assert len(grpc.stderr.strip().splitlines()) == 1


def test_an_agent_on_a_taken_port_names_the_flag() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        rpc = _run(
            "agents.cli", "join", "127.0.0.1:1", "--no-mdns", "--token", "t", "--port", str(port)
        )
        data = _run(
            "agents.cli",
            "join",
            "127.0.0.1:1",
            "--no-mdns",
            "--token",
            "t",
            "--data-port",
            str(port),
        )
    assert rpc.returncode == 2
    assert rpc.stderr.strip().splitlines() == [
        f"edge-agent: port {port} (--port) is taken; pick another with --port (0: any free port)"
    ]
    assert data.returncode == 2 and "(--data-port) is taken" in data.stderr


def test_local_agents_split_the_cores_between_them() -> None:
    from edgecluster.runtime.local_agents import agent_cores

    assert [agent_cores([0, 1], 1, 0)] == [frozenset({0, 1})]  # one agent: every core
    assert [agent_cores([0, 1, 2, 3], 2, i) for i in range(2)] == [
        frozenset({0, 1}),
        frozenset({2, 3}),
    ]
    # more agents than cores: one core each, round-robin
    assert [agent_cores([0, 1], 3, i) for i in range(3)] == [
        frozenset({0}),
        frozenset({1}),
        frozenset({0}),
    ]
