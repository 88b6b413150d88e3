"""The committed protobuf stubs are exactly what scripts/gen_proto.py generates from proto/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "edgecluster" / "net" / "pb"
GENERATED_FILES = ["edgecluster_pb2.py", "edgecluster_pb2.pyi", "edgecluster_pb2_grpc.py"]


def _gen_proto_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) is not installed")
    gen_proto = _gen_proto_module()
    gen_proto.generate(tmp_path)
    fresh = tmp_path / "edgecluster" / "net" / "pb"
    produced = sorted(p.name for p in fresh.iterdir() if p.is_file())
    assert produced == sorted(GENERATED_FILES)
    stale = [
        name
        for name in GENERATED_FILES
        if (fresh / name).read_bytes() != (COMMITTED / name).read_bytes()
    ]
    assert not stale, (
        f"{stale} differ from what proto/ generates: run `python scripts/gen_proto.py` "
        "and commit the result"
    )


def test_every_proto_file_is_generated() -> None:
    gen_proto = _gen_proto_module()
    protos = sorted(
        str(p.relative_to(gen_proto.PROTO_DIR)) for p in gen_proto.PROTO_DIR.rglob("*.proto")
    )
    assert protos == sorted(gen_proto.PROTO_FILES)


def test_the_generator_is_pinned_to_the_installed_grpcio_tools() -> None:
    from importlib.metadata import version

    gen_proto = _gen_proto_module()
    assert version("grpcio-tools") == gen_proto.PINNED_GRPCIO_TOOLS
    assert version("grpcio") == gen_proto.PINNED_GRPCIO_TOOLS  # runtime matches the stubs
