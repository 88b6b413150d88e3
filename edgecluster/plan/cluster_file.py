"""The cluster file (`--cluster FILE`): emulated devices and the links between them.

A JSON object (JSON, not YAML, so that it needs no parser beyond the stdlib):

    {
      "devices": [
        {"name": "a", "gflops": 40, "memory": "2GiB", "cpu_quota": 1.0,
         "disk_read_mb_s": 200},
        ...
      ],
      "default_link": {"latency_ms": 2, "bandwidth_mb_s": 100},
      "links": [
        {"from": "a", "to": "b", "latency_ms": 30, "bandwidth_mb_s": 12.5},
        ...
      ]
    }

Per device: `name` (unique), `gflops` (the compute speed it trains at, GFLOP/s, as
measured under its quota), `memory` (its memory limit: bytes, or a size such as
"512MiB"), `cpu_quota` (CPUs its cgroup may use, for emulation) and
`disk_read_mb_s` (sequential read rate, MB/s = 1e6 bytes/s). Per link: latency in
ms and bandwidth in MB/s. A link is symmetric unless both directions are given,
then each direction has its own; pairs with no link use `default_link`; a device
talks to itself for free. Every field is required except `links`; unknown keys are
errors (they are usually typos). Pure: parsing and validation, no sockets. Issue
13's planner reads the same file.

The links alone (`LinkTable`) are what emulated sessions need: `link_matrix` turns
them into per-rank delay and bandwidth matrices for a session's names, and
`incoming_links` into one rank's SessionConfig figures. `load_links` also reads a
file of links alone (`default_link` optional: pairs not listed are not emulated),
which is what the testbed writes from a compose file's `x-edgecluster` section.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecluster.units import parse_size

__all__ = ["ClusterSpec", "DeviceSpec", "LinkSpec", "load_cluster_file", "parse_cluster"]
__all__ += ["LinkMatrix", "LinkTable", "incoming_links", "link_matrix", "load_links", "parse_links"]

_DEVICE_KEYS = ("name", "gflops", "memory", "cpu_quota", "disk_read_mb_s")
_LINK_KEYS = ("latency_ms", "bandwidth_mb_s")
MB = 1_000_000


def _check_positive(what: str, value: float, *, allow_zero: bool = False) -> None:
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{what} must be a finite number {bound}, got {value}")


@dataclass(frozen=True, kw_only=True)
class DeviceSpec:
    """One device of the cluster file."""

    name: str
    gflops: float
    memory_bytes: int
    cpu_quota: float
    disk_read_bytes_per_s: float

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a device has an empty name; give every device a unique name")
        _check_positive(f"device {self.name}: gflops", self.gflops)
        _check_positive(f"device {self.name}: memory", self.memory_bytes)
        _check_positive(f"device {self.name}: cpu_quota", self.cpu_quota)
        _check_positive(f"device {self.name}: disk_read_mb_s", self.disk_read_bytes_per_s)


@dataclass(frozen=True, kw_only=True)
class LinkSpec:
    """One direction of a link: latency and bandwidth."""

    latency_ms: float
    bandwidth_mb_s: float

    def __post_init__(self) -> None:
        _check_positive("link latency_ms", self.latency_ms, allow_zero=True)
        _check_positive("link bandwidth_mb_s", self.bandwidth_mb_s)

    def transfer_s(self, num_bytes: float) -> float:
        """Seconds to move `num_bytes` over this link: latency plus bytes / bandwidth."""
        return self.latency_ms / 1000.0 + num_bytes / (self.bandwidth_mb_s * MB)


@dataclass(frozen=True, kw_only=True)
class ClusterSpec:
    """Devices and directed links; `link(a, b)` answers for every pair."""

    devices: tuple[DeviceSpec, ...]
    default_link: LinkSpec
    links: Mapping[tuple[str, str], LinkSpec] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.devices:
            raise ValueError("the cluster has no devices; list at least one under 'devices'")
        names = [d.name for d in self.devices]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"device names must be unique; repeated: {', '.join(dupes)}")
        for a, b in self.links:
            for end in (a, b):
                if end not in names:
                    raise ValueError(
                        f"link {a} -> {b} names unknown device {end!r}; devices are "
                        f"{', '.join(names)}"
                    )
            if a == b:
                raise ValueError(f"link {a} -> {b} joins a device to itself; remove it")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.devices)

    def device(self, name: str) -> DeviceSpec:
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(f"no device {name!r} in the cluster ({', '.join(self.names)})")

    def link(self, src: str, dst: str) -> LinkSpec:
        """The link from `src` to `dst`: given, else its reverse, else the default."""
        return self.links.get((src, dst)) or self.links.get((dst, src)) or self.default_link

    def transfer_s(self, src: str, dst: str, num_bytes: float) -> float:
        """Seconds to send `num_bytes` from `src` to `dst`; 0 on the same device."""
        return 0.0 if src == dst else self.link(src, dst).transfer_s(num_bytes)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form `parse_cluster` reads back."""
        return {
            "devices": [
                {
                    "name": d.name,
                    "gflops": d.gflops,
                    "memory": d.memory_bytes,
                    "cpu_quota": d.cpu_quota,
                    "disk_read_mb_s": d.disk_read_bytes_per_s / MB,
                }
                for d in self.devices
            ],
            "default_link": _link_dict(self.default_link),
            "links": [
                {"from": a, "to": b, **_link_dict(spec)} for (a, b), spec in self.links.items()
            ],
        }


def _link_dict(spec: LinkSpec) -> dict[str, float]:
    return {"latency_ms": spec.latency_ms, "bandwidth_mb_s": spec.bandwidth_mb_s}


def load_cluster_file(path: str | Path) -> ClusterSpec:
    """Read and validate a cluster file; ValueError naming the file and the problem."""
    p = Path(path)
    data = _read_json(p)
    try:
        return parse_cluster(data)
    except ValueError as exc:
        raise ValueError(f"cluster file {p}: {exc}") from exc


def _read_json(p: Path) -> Any:
    try:
        text = p.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read cluster file {p}: {exc.strerror or exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"cluster file {p} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc


def parse_cluster(data: Any) -> ClusterSpec:
    """A ClusterSpec from the decoded JSON object of a cluster file."""
    top = _object(data, "the cluster file", required=("devices", "default_link"))
    _no_unknown(top, ("devices", "default_link", "links"), "the cluster file")
    devices_raw = top["devices"]
    if not isinstance(devices_raw, list):
        raise ValueError("'devices' must be a list of device objects")
    devices = tuple(_parse_device(i, d) for i, d in enumerate(devices_raw))
    default_link = _parse_link(top["default_link"], "default_link")
    links = _parse_link_list(top.get("links", []))
    return ClusterSpec(devices=devices, default_link=default_link, links=links)


def _parse_link_list(links_raw: Any) -> dict[tuple[str, str], LinkSpec]:
    if not isinstance(links_raw, list):
        raise ValueError("'links' must be a list of link objects")
    links: dict[tuple[str, str], LinkSpec] = {}
    for i, raw in enumerate(links_raw):
        where = f"links[{i}]"
        obj = _object(raw, where, required=("from", "to", *_LINK_KEYS))
        _no_unknown(obj, ("from", "to", *_LINK_KEYS), where)
        pair = (str(obj["from"]), str(obj["to"]))
        if pair in links:
            raise ValueError(f"{where}: link {pair[0]} -> {pair[1]} is given twice; keep one")
        if pair[0] == pair[1]:
            raise ValueError(
                f"{where}: link {pair[0]} -> {pair[1]} joins a device to itself; remove it"
            )
        links[pair] = _parse_link(obj, where)
    return links


def _parse_device(index: int, raw: Any) -> DeviceSpec:
    where = f"devices[{index}]"
    obj = _object(raw, where, required=_DEVICE_KEYS)
    _no_unknown(obj, _DEVICE_KEYS, where)
    where = f"device {obj['name']!r}"
    memory = obj["memory"]
    memory_bytes = parse_size(memory) if isinstance(memory, str) else _number(memory, where)
    return DeviceSpec(
        name=str(obj["name"]),
        gflops=_number(obj["gflops"], f"{where} gflops"),
        memory_bytes=int(memory_bytes),
        cpu_quota=_number(obj["cpu_quota"], f"{where} cpu_quota"),
        disk_read_bytes_per_s=_number(obj["disk_read_mb_s"], f"{where} disk_read_mb_s") * MB,
    )


def _parse_link(raw: Any, where: str) -> LinkSpec:
    obj = _object(raw, where, required=_LINK_KEYS)
    if where == "default_link":
        _no_unknown(obj, _LINK_KEYS, where)
    try:
        return LinkSpec(
            latency_ms=_number(obj["latency_ms"], f"{where} latency_ms"),
            bandwidth_mb_s=_number(obj["bandwidth_mb_s"], f"{where} bandwidth_mb_s"),
        )
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc


def _object(raw: Any, where: str, *, required: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(raw).__name__}")
    missing = [key for key in required if key not in raw]
    if missing:
        raise ValueError(f"{where} is missing {', '.join(repr(k) for k in missing)}")
    return raw


def _no_unknown(obj: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise ValueError(
            f"{where} has unknown key(s) {', '.join(repr(k) for k in unknown)}; allowed: "
            f"{', '.join(allowed)}"
        )


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be a number, got {value!r}")
    return float(value)


# ---- links alone: the emulated network of a session ----


@dataclass(frozen=True, kw_only=True)
class LinkTable:
    """Directed links by name, and the link of every other pair (None: not emulated)."""

    default_link: LinkSpec | None
    links: Mapping[tuple[str, str], LinkSpec] = field(default_factory=dict)

    @classmethod
    def of(cls, cluster: ClusterSpec) -> LinkTable:
        return cls(default_link=cluster.default_link, links=dict(cluster.links))

    def link(self, src: str, dst: str) -> LinkSpec | None:
        """The link from `src` to `dst`: given, else its reverse, else the default."""
        return self.links.get((src, dst)) or self.links.get((dst, src)) or self.default_link

    def to_dict(self) -> dict[str, Any]:
        """The JSON form `parse_links` reads back."""
        out: dict[str, Any] = {}
        if self.default_link is not None:
            out["default_link"] = _link_dict(self.default_link)
        out["links"] = [
            {"from": a, "to": b, **_link_dict(spec)} for (a, b), spec in self.links.items()
        ]
        return out


def parse_links(data: Any) -> LinkTable:
    """The links of a decoded JSON object holding `default_link` (optional here: pairs
    not listed are then not emulated) and `links`, in the cluster file's vocabulary."""
    top = _object(data, "the links", required=())
    _no_unknown(top, ("default_link", "links"), "the links")
    raw_default = top.get("default_link")
    default_link = None if raw_default is None else _parse_link(raw_default, "default_link")
    return LinkTable(default_link=default_link, links=_parse_link_list(top.get("links", [])))


def load_links(path: str | Path) -> LinkTable:
    """The links of a cluster file (validated whole), or of a file of links alone (no
    `devices`: see `parse_links`); ValueError naming the file and the problem."""
    p = Path(path)
    data = _read_json(p)
    try:
        if isinstance(data, dict) and "devices" in data:
            return LinkTable.of(parse_cluster(data))
        return parse_links(data)
    except ValueError as exc:
        raise ValueError(f"cluster file {p}: {exc}") from exc


LinkMatrix = tuple[list[list[float]], list[list[float]]]  # (delay_ms, bandwidth_mb_s)[i][j]


def link_matrix(cluster: ClusterSpec | LinkTable, names: Sequence[str]) -> LinkMatrix:
    """Per-rank link figures for a session whose ranks are `names` (rank 0 may be
    "coordinator": a device if the file names it, else it gets the default link).

    Returns (delay_ms, bandwidth_mb_s), each [rank][rank]: the link from names[i] to
    names[j]. A name the file does not list gets the default link; a name talking to
    itself, or a pair with no link at all (LinkTable without a default), gets 0 ms
    and bandwidth 0, which means unlimited.
    """
    delays = [[0.0] * len(names) for _ in names]
    bandwidths = [[0.0] * len(names) for _ in names]
    for i, src in enumerate(names):
        for j, dst in enumerate(names):
            spec = None if src == dst else cluster.link(src, dst)
            if spec is not None:
                delays[i][j], bandwidths[i][j] = spec.latency_ms, spec.bandwidth_mb_s
    return delays, bandwidths


def incoming_links(matrix: LinkMatrix, rank: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Rank `rank`'s SessionConfig.link_delays_ms and link_bandwidths_mb_s: per peer,
    the link from that peer to `rank` (a column of `link_matrix`)."""
    delays, bandwidths = matrix
    if not 0 <= rank < len(delays):
        raise ValueError(f"rank {rank} outside a link matrix of {len(delays)} ranks")
    return tuple(row[rank] for row in delays), tuple(row[rank] for row in bandwidths)


def session_links(
    matrix: LinkMatrix | None, rank: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Rank `rank`'s per-peer link delays and bandwidths for its SessionSpec and
    SessionConfig; empty (no emulation) without a matrix."""
    return ((), ()) if matrix is None else incoming_links(matrix, rank)
