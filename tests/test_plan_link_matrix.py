"""Link matrices for emulated sessions: a cluster file's links by rank, and files of
links alone (what the testbed writes from a compose file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edgecluster.plan.cluster_file import (
    LinkTable,
    incoming_links,
    link_matrix,
    load_links,
    parse_cluster,
    parse_links,
)

DEVICE = {"gflops": 10, "memory": "1GiB", "cpu_quota": 1, "disk_read_mb_s": 100}
CLUSTER: dict[str, Any] = {
    "devices": [{"name": name, **DEVICE} for name in ("a", "b", "c")],
    "default_link": {"latency_ms": 2, "bandwidth_mb_s": 100},
    "links": [
        {"from": "a", "to": "b", "latency_ms": 30, "bandwidth_mb_s": 10},
        {"from": "c", "to": "a", "latency_ms": 50, "bandwidth_mb_s": 5},
        {"from": "a", "to": "c", "latency_ms": 5, "bandwidth_mb_s": 50},
    ],
}


def test_matrix_by_rank_with_the_coordinator_on_the_default_link() -> None:
    delays, bandwidths = link_matrix(parse_cluster(CLUSTER), ["coordinator", "a", "b", "c"])
    assert delays == [
        [0, 2, 2, 2],  # "coordinator" is not a device of the file: the default link
        [2, 0, 30, 5],
        [2, 30, 0, 2],  # b -> a: given one way only, so symmetric
        [2, 50, 2, 0],  # c -> a: given both ways
    ]
    assert bandwidths[1] == [100, 0, 10, 50]  # 0 on the diagonal: unlimited
    assert bandwidths[3][1] == 5


def test_a_coordinator_the_file_names_is_a_device_and_unknown_names_get_the_default() -> None:
    data = {
        **CLUSTER,
        "devices": [*CLUSTER["devices"], {"name": "coordinator", **DEVICE}],
        "links": [{"from": "coordinator", "to": "b", "latency_ms": 70, "bandwidth_mb_s": 1}],
    }
    delays, bandwidths = link_matrix(parse_cluster(data), ["coordinator", "b", "phone", "b"])
    assert delays[0] == [0, 70, 2, 70]
    assert delays[2] == [2, 2, 0, 2]
    assert delays[1][3] == 0 and bandwidths[1][3] == 0  # one device under two ranks
    assert bandwidths[1][0] == 1


def test_incoming_links_are_a_column_of_the_matrix() -> None:
    matrix = link_matrix(parse_cluster(CLUSTER), ["a", "b", "c"])
    delays, bandwidths = incoming_links(matrix, 0)  # what rank 0 ("a") receives from each
    assert delays == (0, 30, 50) and bandwidths == (0, 10, 5)
    with pytest.raises(ValueError, match="rank 3 outside a link matrix of 3 ranks"):
        incoming_links(matrix, 3)


def test_links_alone_without_a_default_leave_other_pairs_unemulated() -> None:
    table = parse_links({"links": [{"from": "x", "to": "y", "latency_ms": 9, "bandwidth_mb_s": 3}]})
    delays, bandwidths = link_matrix(table, ["x", "y", "z"])
    assert delays == [[0, 9, 0], [9, 0, 0], [0, 0, 0]]
    assert bandwidths[2] == [0, 0, 0]
    assert parse_links(json.loads(json.dumps(table.to_dict()))) == table


def test_load_links_reads_a_cluster_file_or_links_alone(tmp_path: Path) -> None:
    full, alone = tmp_path / "cluster.json", tmp_path / "links.json"
    full.write_text(json.dumps(CLUSTER))
    alone.write_text(json.dumps({"default_link": CLUSTER["default_link"]}))
    table = load_links(full)
    assert table.link("b", "a").latency_ms == 30 and table.link("b", "c").latency_ms == 2
    assert load_links(alone) == LinkTable(default_link=parse_cluster(CLUSTER).default_link)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"links": [{"from": "x", "to": "y", "latency_ms": -1, "bandwidth_mb_s": 1}]}, "latency"),
        ({"links": [{"from": "x", "to": "y", "latency_ms": 1}]}, "missing 'bandwidth_mb_s'"),
        ({"links": [{"from": "x", "to": "x", "latency_ms": 1, "bandwidth_mb_s": 1}]}, "itself"),
        ({"default_link": {"latency_ms": 1, "bandwidth_mb_s": 0}}, "bandwidth_mb_s must be"),
        ({"default_lnk": {}}, "unknown key.*'default_lnk'"),
        ({**CLUSTER, "devices": []}, "no devices"),
    ],
)
def test_bad_links_files_are_named_with_the_problem(
    tmp_path: Path, data: dict[str, Any], message: str
) -> None:
    path = tmp_path / "links.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"cluster file {path}: .*{message}"):
        load_links(path)


def test_serve_takes_a_cluster_file_and_refuses_a_bad_one(tmp_path: Path) -> None:
    from coordinator.cli import _serve_config, build_parser

    good, bad = tmp_path / "cluster.json", tmp_path / "bad.json"
    good.write_text(json.dumps(CLUSTER))
    bad.write_text('{"links": [}')
    args = build_parser().parse_args(["serve", "--cluster", str(good)])
    assert _serve_config(args, "token", None).cluster_file == str(good)
    args = build_parser().parse_args(["serve", "--cluster", str(bad)])
    with pytest.raises(ValueError, match=f"cluster file {bad} is not valid JSON"):
        _serve_config(args, "token", None)
