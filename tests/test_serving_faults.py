"""Faults inside a serving cluster, on real processes: a coordinator serving a tiny random
Llama with two `--local` agents.

- A step that fails after its header went out (injected below the API with the
  test-only EDGE_TEST_FAULT_TOKEN) ends its request with a 503 naming the cause, the
  session is reset, /health comes back and the next request gets the same answer.
- A token id outside the vocabulary that reaches the scheduler is refused (4xx).
- `status --json` and GET /v1/cluster agree, live agents' rss included.
- A SIGKILLed local agent is reaped and restarted under the same node id, and the
  cluster serves again.
"""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.procs import (
    Coordinator,
    ProcessPool,
    module_procs,  # noqa: F401  (fixture)
    wait_until,
)
from tests.tiny_llama import make_tiny_llama

pytestmark = pytest.mark.slow
FAULT_TOKEN = 7
PROMPT = [1, 5, 9, 13]
READY_S = 120.0  # generous: two agents load a model on a busy 2-core box
MODEL_IDS: dict[str, str] = {}  # coordinator name -> the model it serves (its --model)


def _health(coord: Coordinator) -> int:
    try:
        with urllib.request.urlopen(coord.url + "/health", timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except OSError:
        return 0


def _complete(coord: Coordinator, prompt: list[int], max_tokens: int = 6) -> tuple[int, Any]:
    body = {
        "model": MODEL_IDS[coord.name],
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    req = urllib.request.Request(
        coord.url + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _wait_serving(coord: Coordinator, what: str) -> None:
    try:
        wait_until(lambda: _health(coord) == 200, READY_S, what, interval_s=0.2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{coord.describe()}") from None


@pytest.fixture(scope="module")
def cluster(module_procs: ProcessPool) -> Coordinator:  # noqa: F811
    model = make_tiny_llama(module_procs.root / "tiny-model", max_positions=256)
    coord = module_procs.coordinator(
        "--model", str(model), "--local", "2", "--max-context", "256",
        env={"EDGE_TEST_FAULT_TOKEN": str(FAULT_TOKEN)},
    )  # fmt: skip
    MODEL_IDS[coord.name] = str(model)
    _wait_serving(coord, "the tiny model to be served")
    return coord


@pytest.fixture(scope="module")
def baseline(cluster: Coordinator) -> str:
    status, body = _complete(cluster, PROMPT)
    assert status == 200, body
    return str(body["choices"][0]["text"])


def test_status_json_and_cluster_view_agree_with_live_rss(
    cluster: Coordinator,
    module_procs: ProcessPool,  # noqa: F811
) -> None:
    def both() -> tuple[list[dict], list[dict]] | None:
        result = module_procs.status(cluster, "--json")
        assert result.returncode == 0, result.stderr
        from_status = json.loads(result.stdout)["agents"]
        from_http = (cluster.cluster() or {}).get("agents", [])
        live = [a for a in from_status + from_http if a["state"] == "alive"]
        return (
            (from_status, from_http)
            if len(live) == 4 and all(a["rss_bytes"] for a in live)
            else None
        )

    from_status, from_http = wait_until(both, 30, "both views to list live agents with rss")
    volatile = {"memory_available_bytes", "last_seen_s_ago", "rss_bytes", "peak_rss_bytes"}
    assert [set(a) for a in from_status] == [set(a) - {"shard"} for a in from_http]
    for s, h in zip(from_status, from_http, strict=True):
        assert {k: v for k, v in s.items() if k not in volatile} == {
            k: v for k, v in h.items() if k not in volatile | {"shard"}
        }
        assert s["rss_bytes"] > 50 << 20 and h["rss_bytes"] > 50 << 20  # a python process


def test_a_step_failing_mid_broadcast_is_a_503_then_the_cluster_serves_again(
    cluster: Coordinator, baseline: str
) -> None:
    status, body = _complete(cluster, [1, FAULT_TOKEN, 3])
    assert status == 503, body
    message = body["error"]["message"]
    assert "injected test fault" in message and "RuntimeError" in message, message
    _wait_serving(cluster, "the session to be reset")
    status, body = _complete(cluster, PROMPT)
    assert status == 200, body
    assert body["choices"][0]["text"] == baseline
    assert "resetting after a failed step" in cluster.stderr()


def test_a_token_outside_the_vocabulary_is_refused_and_serving_goes_on(
    cluster: Coordinator, baseline: str
) -> None:
    status, body = _complete(cluster, [999999999])
    assert 400 <= status < 500, body
    assert "999999999" in body["error"]["message"]
    assert _health(cluster) == 200
    status, body = _complete(cluster, PROMPT)
    assert status == 200 and body["choices"][0]["text"] == baseline, body


def _local_agent(coord: Coordinator, name: str) -> psutil.Process | None:
    for child in psutil.Process(coord.pid).children(recursive=True):
        try:
            argv = child.cmdline()
            named = "agents.cli" in argv and argv[argv.index("--name") + 1] == name
            if named and child.status() != psutil.STATUS_ZOMBIE:
                return child
        except (psutil.NoSuchProcess, ValueError, IndexError):
            continue
    return None


def test_a_killed_local_agent_is_reaped_and_restarted_as_the_same_node(
    cluster: Coordinator, baseline: str
) -> None:
    before = cluster.member("local-0")
    assert before is not None and before["state"] == "alive"
    victim = _local_agent(cluster, "local-0")
    assert victim is not None
    victim.send_signal(signal.SIGKILL)
    again = wait_until(
        lambda: (p := _local_agent(cluster, "local-0")) and p.pid != victim.pid and p,
        30,
        "local-0 to be restarted",
        interval_s=0.1,
    )
    zombies = [
        c.pid for c in psutil.Process(cluster.pid).children() if c.status() == psutil.STATUS_ZOMBIE
    ]
    assert zombies == [], f"unreaped children {zombies}"
    assert not psutil.pid_exists(victim.pid) or victim.status() != psutil.STATUS_ZOMBIE
    member = cluster.wait_member("local-0", "alive", timeout_s=60)
    assert member["id"] == before["id"]
    assert again.is_running()

    def serves() -> bool:
        status, body = _complete(cluster, PROMPT)
        return status == 200 and body["choices"][0]["text"] == baseline

    wait_until(serves, READY_S, "the cluster to serve again", interval_s=0.5)
    log = Path(cluster.stderr_path)
    assert "local agent local-0 exited" in log.read_text(), cluster.describe()
