"""The testbed's state file: everything `up` created, by name, so `down` can remove it.

Written before anything is created and rewritten after each process starts, so
a crash half-way through `up` still leaves a complete list behind.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgecluster.testbed.processes import ProcessRecord

STATE_FILE = "state.json"


@dataclass(frozen=True, kw_only=True)
class ServiceRecord:
    name: str
    netns: str
    veth: str
    address: str
    cgroup: str
    log: str
    argv: tuple[str, ...] = ()
    process: ProcessRecord | None = None


@dataclass(frozen=True, kw_only=True)
class TestbedState:
    project: str
    bridge: str
    veth_prefix: str
    subnet: str
    services: tuple[ServiceRecord, ...]
    forwards: tuple[str, ...] = ()
    supervisor: ProcessRecord | None = None
    mountpoints: tuple[str, ...] = ()  # directories created on the host for volume targets

    def service(self, name: str) -> ServiceRecord:
        return next(service for service in self.services if service.name == name)


def state_path(state_dir: Path) -> Path:
    return state_dir / STATE_FILE


def save(state: TestbedState, state_dir: Path) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_path(state_dir).with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2) + "\n")
    os.replace(tmp, state_path(state_dir))


def load(state_dir: Path) -> TestbedState | None:
    path = state_path(state_dir)
    if not path.exists():
        return None
    raw = json.loads(path.read_text())
    services = tuple(_service(item) for item in raw.pop("services"))
    supervisor = _process(raw.pop("supervisor"))
    forwards, mountpoints = tuple(raw.pop("forwards")), tuple(raw.pop("mountpoints"))
    return TestbedState(
        services=services, supervisor=supervisor, forwards=forwards, mountpoints=mountpoints, **raw
    )


def remove(state_dir: Path) -> bool:
    path = state_path(state_dir)
    if not path.exists():
        return False
    path.unlink()
    return True


def _service(raw: dict[str, Any]) -> ServiceRecord:
    process = _process(raw.pop("process"))
    return ServiceRecord(process=process, argv=tuple(raw.pop("argv")), **raw)


def _process(raw: dict[str, int] | None) -> ProcessRecord | None:
    return None if raw is None else ProcessRecord(**raw)
