"""An agent's data dir is its own: locked for its lifetime; unnamed agents on one host
take distinct dirs and names; a named one refuses a taken dir in one clear line; old
shards are pruned beyond --cache-limit, least recently used first."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch

from edgecluster.runtime.data_dir_lock import data_dir_in_use, lock_data_dir, release_data_dir
from edgecluster.runtime.local_agents import _free_names
from edgecluster.types import ShardSpec
from edgecluster.weights.shard_store import ShardStore
from edgecluster.weights.slicing import tensor_digest
from tests.procs import ProcessPool, command, procs, wait_until  # noqa: F401

SPEC = ShardSpec(
    q_head_start=0, q_head_end=1, kv_head_start=0, kv_head_end=1,
    mlp_col_start=0, mlp_col_end=4, holds_output_bias=True,
)  # fmt: skip
CONFIG_JSON = (
    '{"model_type": "llama", "hidden_size": 8, "intermediate_size": 16, "num_layers": 1, '
    '"num_heads": 1, "num_kv_heads": 1, "head_dim": 8, "vocab_size": 32, '
    '"rms_norm_eps": 1e-5, "rope_theta": 10000.0}'
)


def _unnamed_agent(procs: ProcessPool, coordinator: str, tag: str):  # noqa: F811
    argv = [*command("edge-agent"), "join", coordinator, "--token", "test-token", "--no-mdns"]
    return procs.start(f"unnamed-{tag}", [*argv, "--threads", "1"])


def test_two_unnamed_agents_on_one_host_join_with_distinct_dirs_and_names(
    procs: ProcessPool,  # noqa: F811
) -> None:
    coord = procs.coordinator()
    first = _unnamed_agent(procs, coord.grpc_address, "a")
    second = _unnamed_agent(procs, coord.grpc_address, "b")

    def two_alive() -> list[dict] | None:
        agents = [a for a in (coord.cluster() or {}).get("agents", []) if a["state"] == "alive"]
        return agents if len(agents) == 2 else None

    # generous: the first test of a cold suite waits for two cold torch imports
    agents = wait_until(two_alive, 90, "two unnamed agents to join")
    host = socket.gethostname()
    assert sorted(a["name"] for a in agents) == [host, f"{host}-2"]
    assert len({a["id"] for a in agents}) == 2
    base = procs.root / "cache" / "agents"
    assert (base / host / "node_id").is_file() and (base / f"{host}-2" / "node_id").is_file()
    assert "in use by another agent" in first.stderr() + second.stderr()
    assert first.running() and second.running()


def test_a_named_agent_refuses_a_taken_dir_in_one_line(
    procs: ProcessPool,  # noqa: F811
) -> None:
    coord = procs.coordinator()
    data_dir = procs.root / "shared-dir"
    procs.agent(coord.grpc_address, name="holder", data_dir=data_dir)
    coord.wait_member("holder", "alive", timeout_s=20)
    refused = procs.agent(coord.grpc_address, name="intruder", data_dir=data_dir)
    assert refused.wait(20) == 2
    lines = [line for line in refused.stderr().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert str(data_dir) in lines[0] and "--name" in lines[0] and "--data-dir" in lines[0]
    assert coord.member("intruder") is None


def test_lock_is_held_until_released_and_local_names_skip_taken_dirs(tmp_path: Path) -> None:
    held = tmp_path / "local-0"
    assert not data_dir_in_use(held)
    lock_data_dir(held)
    try:
        assert lock_data_dir(held) == held.resolve()  # this process asking again: fine
        probe = os.fork()  # another process sees it taken
        if probe == 0:
            os._exit(0 if data_dir_in_use(held) else 1)
        assert os.waitpid(probe, 0)[1] == 0
        pid = os.fork()  # ...and the next local agent takes local-1, local-2
        if pid == 0:
            os._exit(0 if _free_names(tmp_path, 2) == ["local-1", "local-2"] else 1)
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        release_data_dir(held)
    assert not data_dir_in_use(held)


def _fill(store: ShardStore, key: str, kib: int) -> None:
    store.write_meta(key, CONFIG_JSON, SPEC, torch.float32)
    tensors = {"w": torch.zeros(kib * 256)}
    store.write_block(key, "layers.000.mlp", tensors, tensor_digest(tensors))


def test_prune_keeps_the_shard_in_use_and_the_most_recently_used(tmp_path: Path) -> None:
    store = ShardStore(tmp_path, cache_limit_bytes=250 * 1024)
    for i, key in enumerate(["old", "used", "recent"]):
        _fill(store, key, 100)
        stamp = time.time() - 100 + i
        os.utime(store.shard_dir(key) / "manifest.json", (stamp, stamp))
    assert store.shard_keys() == ["old", "recent", "used"]  # pruning runs on prepare and use
    store.use("used")  # the session's shard: kept and now the most recent; "old" goes
    assert store.shard_keys() == ["recent", "used"]
    _fill(store, "new", 100)  # prepared while "used" serves: both kept
    assert store.shard_keys() == ["new", "recent", "used"]
    store.use("new")  # "recent" is now the least recently used
    assert store.shard_keys() == ["new", "used"]
    unlimited = ShardStore(tmp_path / "all")
    for key in ("a", "b", "c"):
        _fill(unlimited, key, 100)
    assert unlimited.shard_keys() == ["a", "b", "c"]


def test_a_holder_that_has_not_written_its_pid_yet_is_still_refused(tmp_path: Path) -> None:
    """Two agents starting at once: one holds the lock, its pid not yet written."""
    import fcntl

    from edgecluster.runtime.data_dir_lock import LOCK_FILE, DataDirInUse

    data_dir = tmp_path / "racing"
    data_dir.mkdir()
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held, still empty
        with pytest.raises(DataDirInUse, match="in use by another agent;"):
            lock_data_dir(data_dir)
    finally:
        os.close(fd)
