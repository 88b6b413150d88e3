"""Compose value syntax: `${VAR:-default}` interpolation, Docker byte sizes, tc bandwidths."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from edgecluster.errors import EdgeClusterError

_VAR_RE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)
_DOCKER_BYTES_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)i?b?\s*$", re.IGNORECASE)
_BANDWIDTH_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)(bit|bps)\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


class ComposeError(EdgeClusterError, ValueError):
    """The compose file uses something the testbed cannot emulate, or is malformed."""


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """`value` with `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR:?error}` and `$$` replaced."""
    if isinstance(value, str):
        return _VAR_RE.sub(lambda match: _substitute(match, env), value)
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    return value


def _substitute(match: re.Match[str], env: Mapping[str, str]) -> str:
    if match["escaped"]:
        return "$"
    name = match["braced"] or match["bare"]
    op, arg = match["op"], match["arg"] or ""
    current = env.get(name)
    missing = current is None or (current == "" and op is not None and op.startswith(":"))
    if not missing:
        return str(current)
    if op is not None and op.endswith("?"):
        raise ComposeError(f"variable {name} must be set: {arg or 'no default given'}")
    return arg if op is not None else ""


def parse_docker_bytes(value: str | int | float) -> int:
    """Bytes in a Docker size such as 400m, 1.5g, 3GB (binary units, as Docker reads them)."""
    if isinstance(value, int | float):
        return int(value)
    match = _DOCKER_BYTES_RE.match(value)
    if match is None:
        raise ValueError(f"cannot read size {value!r}: use a byte count or 400m, 1.5g, 20mb")
    return int(float(match.group(1)) * 1024 ** _POWERS[match.group(2).lower()])


def parse_bandwidth(value: str) -> int:
    """Bits per second in a tc rate such as 100mbit, 1gbit, 500kbit or 10mbps (bytes/s)."""
    match = _BANDWIDTH_RE.match(value)
    if match is None:
        raise ValueError(f"cannot read bandwidth {value!r}: use e.g. 100mbit, 1gbit, 10mbps")
    bits = float(match.group(1)) * 1000 ** _POWERS[match.group(2).lower()]
    return int(bits * (8 if match.group(3).lower() == "bps" else 1))


def as_mapping(value: Any, where: str, *, lists: bool = False) -> Mapping[str, Any]:
    """`value` as a mapping ({} for None); a list of names becomes {name: None} if `lists`."""
    if value is None:
        return {}
    if lists and isinstance(value, list):
        return dict.fromkeys(map(str, value))
    if not isinstance(value, dict):
        raise ComposeError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value
