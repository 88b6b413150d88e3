"""The cluster file: parsing, per-pair links, and clear errors for bad files."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from edgecluster.plan.cluster_file import load_cluster_file, parse_cluster

GOOD: dict[str, Any] = {
    "devices": [
        {"name": "a", "gflops": 40, "memory": "2GiB", "cpu_quota": 1.5, "disk_read_mb_s": 200},
        {
            "name": "b",
            "gflops": 10,
            "memory": 1_000_000_000,
            "cpu_quota": 0.5,
            "disk_read_mb_s": 50,
        },
        {"name": "c", "gflops": 20, "memory": "512MiB", "cpu_quota": 1, "disk_read_mb_s": 100},
    ],
    "default_link": {"latency_ms": 2, "bandwidth_mb_s": 100},
    "links": [
        {"from": "a", "to": "b", "latency_ms": 30, "bandwidth_mb_s": 10},
        {"from": "a", "to": "c", "latency_ms": 5, "bandwidth_mb_s": 50},
        {"from": "c", "to": "a", "latency_ms": 50, "bandwidth_mb_s": 5},
    ],
}


def test_good_file_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(GOOD))
    cluster = load_cluster_file(path)
    assert cluster.names == ("a", "b", "c")
    assert cluster.device("a").memory_bytes == 2 * 1024**3
    assert cluster.device("b").disk_read_bytes_per_s == 50e6
    assert parse_cluster(json.loads(json.dumps(cluster.to_dict()))) == cluster


def test_links_are_symmetric_unless_both_ways_are_given() -> None:
    cluster = parse_cluster(GOOD)
    assert cluster.link("b", "a") == cluster.link("a", "b")  # given one way only
    assert cluster.link("a", "c").latency_ms == 5
    assert cluster.link("c", "a").latency_ms == 50  # given both ways
    assert cluster.link("b", "c") == cluster.default_link
    # 1 MB over 10 MB/s plus 30 ms; nothing to send to oneself
    assert cluster.transfer_s("a", "b", 1e6) == pytest.approx(0.13)
    assert cluster.transfer_s("a", "a", 1e6) == 0.0


def _broken(edit: Any) -> dict[str, Any]:
    data = copy.deepcopy(GOOD)
    edit(data)
    return data


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["links"].append({"from": "a", "to": "zz", "latency_ms": 1,
                                      "bandwidth_mb_s": 1}), "unknown device 'zz'"),
        (lambda d: d["devices"][0].update(gflops=-3), "gflops must be a finite number > 0"),
        (lambda d: d["links"][0].update(latency_ms=-1), "latency_ms must be"),
        (lambda d: d["default_link"].update(bandwidth_mb_s=0), "bandwidth_mb_s must be"),
        (lambda d: d["devices"][1].pop("cpu_quota"), "devices\\[1\\] is missing 'cpu_quota'"),
        (lambda d: d.pop("default_link"), "missing 'default_link'"),
        (lambda d: d["devices"][2].update(name="a"), "unique; repeated: a"),
        (lambda d: d["devices"][0].update(memroy=1), "unknown key\\(s\\) 'memroy'"),
        (lambda d: d["devices"][0].update(memory="lots"), "cannot read size 'lots'"),
        (lambda d: d["devices"][0].update(gflops="fast"), "gflops must be a number"),
        (lambda d: d["links"].append(dict(d["links"][0])), "given twice"),
        (lambda d: d.update(devices=[]), "no devices"),
    ],
)  # fmt: skip
def test_bad_files_say_what_is_wrong(edit: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_cluster(_broken(edit))


def test_unreadable_or_invalid_json_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read cluster file"):
        load_cluster_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"devices": [')
    with pytest.raises(ValueError, match=r"bad.json is not valid JSON"):
        load_cluster_file(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(_broken(lambda d: d["devices"][0].update(cpu_quota=0))))
    with pytest.raises(ValueError, match=r"wrong.json: device a: cpu_quota must be"):
        load_cluster_file(wrong)
