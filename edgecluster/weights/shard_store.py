"""An agent's weight shards on its local disk, verified and crash-safe.

Layout under the store's root:

    shards/<shard_key>/<block>.safetensors   one file per block, e.g. layers.007.mlp
    shards/<shard_key>/manifest.json         {"format", "model_config", "spec",
                                              "storage_dtype", "weights", "blocks":
                                              {block: {"sha256", "bytes",
                                              "tensor_digest"}}}

`weights` is how the block's matrices are stored (`weights.quant`: fp32, bf16, int8,
int4), `storage_dtype` the dtype of everything else (norms, biases). Both are part of
the shard's identity: a shard recorded for one mode never serves another.

A block counts as present only when the manifest lists it and the file on disk has
the listed size and sha256, so a corrupted, truncated or half-written cache is found
by `missing_blocks` and fetched again. Every write goes to a temporary file, is
fsynced and renamed into place; the manifest is replaced the same way after the
block file, so a crash at any point leaves either the old state or the new one.
A block is accepted only if its `tensor_digest` matches the sender's.

One process owns a store at a time (the agent, which locks its data dir); threads
within it may write different blocks concurrently.

Disk budget: with `cache_limit_bytes`, shards beyond the limit are deleted, least
recently used first (a shard's last use is its manifest's mtime, touched when it is
prepared or loaded), never the shards in use (`use`) or being prepared.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from edgecluster.model_config import ModelConfig
from edgecluster.types import ShardSpec
from edgecluster.weights.quant import QUANTIZED_MODES, check_mode
from edgecluster.weights.safetensors_file import read_block_raw
from edgecluster.weights.slicing import tensor_digest

__all__ = ["ShardMeta", "ShardStore", "read_block_raw", "sha256_file"]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
HASH_PIECE_BYTES = 1024 * 1024
STALE_TEMP_S = 3600.0
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


@dataclass(frozen=True, kw_only=True)
class ShardMeta:
    """What a shard holds: the model, this agent's share, the dtype of its norms and
    biases on disk and the form of its matrices (`weights.quant` mode)."""

    model_config: ModelConfig
    spec: ShardSpec
    storage_dtype: torch.dtype
    weights: str = "fp32"

    @property
    def quantized(self) -> bool:
        return self.weights in QUANTIZED_MODES


class ShardStore:
    def __init__(self, root: Path | str, *, cache_limit_bytes: int = 0) -> None:
        self.root = Path(root)
        self.shards_dir = self.root / "shards"
        self.cache_limit_bytes = cache_limit_bytes  # 0: no limit
        self._lock = threading.Lock()
        self._in_use: set[str] = set()

    def shard_dir(self, shard_key: str) -> Path:
        return self.shards_dir / _safe_name(shard_key, "shard key")

    def block_path(self, shard_key: str, block: str) -> Path:
        return self.shard_dir(shard_key) / f"{_safe_name(block, 'block name')}.safetensors"

    def write_meta(
        self,
        shard_key: str,
        model_config_json: str,
        spec: ShardSpec | dict[str, Any],
        storage_dtype: torch.dtype | str,
        weights: str = "",
    ) -> None:
        """Record what the shard holds; a change of any of it forgets the stored blocks.
        `weights` empty: the matrices are dense in `storage_dtype` (fp32 or bf16)."""
        dtype_name = _dtype_name(storage_dtype)
        meta = {
            "model_config": json.loads(model_config_json),
            "spec": asdict(spec) if isinstance(spec, ShardSpec) else dict(spec),
            "storage_dtype": dtype_name,
            "weights": check_mode(weights) if weights else _dense_mode(dtype_name),
        }
        with self._lock:
            manifest = self._read_manifest(shard_key)
            if any(manifest.get(k) != v for k, v in meta.items()) and manifest["blocks"]:
                log.info("shard %s changed model, share or dtype: its blocks are stale", shard_key)
                manifest["blocks"] = {}
            manifest.update(meta)
            self._write_manifest(shard_key, manifest)
            _remove_stale_temp_files(self.shard_dir(shard_key))
        self.prune_to_limit(keep={shard_key})

    def read_meta(self, shard_key: str) -> ShardMeta | None:
        """The recorded meta, or None when the shard has none yet."""
        manifest = self._read_manifest(shard_key)
        if manifest.get("model_config") is None:
            return None
        return ShardMeta(
            model_config=ModelConfig.from_json(json.dumps(manifest["model_config"])),
            spec=ShardSpec(**manifest["spec"]),
            storage_dtype=_dtype(manifest["storage_dtype"]),
            weights=manifest.get("weights") or _dense_mode(manifest["storage_dtype"]),
        )

    def missing_blocks(self, shard_key: str, blocks: list[str]) -> list[str]:
        """Blocks that are absent, unlisted, or whose file's size or sha256 is wrong."""
        listed = self._read_manifest(shard_key)["blocks"]
        return [b for b in blocks if not self._verified(shard_key, b, listed.get(b))]

    def write_block(
        self, shard_key: str, block: str, tensors: dict[str, torch.Tensor], expected_digest: str
    ) -> None:
        """Store a received block after checking it against the sender's tensor digest."""
        digest = tensor_digest(tensors)
        if digest != expected_digest:
            raise ValueError(
                f"block {block} of shard {shard_key} does not match its checksum "
                f"({digest[:12]} != {expected_digest[:12]}): it was damaged in transfer; "
                "fetch it again"
            )
        path = self.block_path(shard_key, block)
        path.parent.mkdir(parents=True, exist_ok=True)
        contiguous = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        tmp = _temp_path(path)
        try:
            save_file(contiguous, str(tmp))
            _fsync(tmp)
            entry = {"sha256": sha256_file(tmp), "bytes": tmp.stat().st_size}
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync(path.parent)
        with self._lock:
            manifest = self._read_manifest(shard_key)
            manifest["blocks"][block] = {**entry, "tensor_digest": digest}
            self._write_manifest(shard_key, manifest)

    def load_block(self, shard_key: str, block: str) -> dict[str, torch.Tensor]:
        """A stored block's tensors as stored (one read of the file); compute prepares
        them (`engine.linear.prepare_block`)."""
        return read_block_raw(self.block_path(shard_key, block))

    def shard_bytes(self, shard_key: str) -> int:
        """Bytes of the block files the manifest lists."""
        blocks = self._read_manifest(shard_key)["blocks"]
        return sum(int(entry["bytes"]) for entry in blocks.values())

    def shard_keys(self) -> list[str]:
        if not self.shards_dir.is_dir():
            return []
        return sorted(p.name for p in self.shards_dir.iterdir() if p.is_dir())

    def use(self, shard_key: str) -> None:
        """Marks `shard_key` as the one in use (never pruned) and recently used; prunes
        the others beyond the cache limit."""
        with self._lock:
            self._in_use = {shard_key}
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.shard_dir(shard_key) / MANIFEST)
        self.prune_to_limit(keep=set())

    def prune_to_limit(self, keep: set[str]) -> list[str]:
        """Deletes the least recently used shards, other than `keep` and the one in use,
        until the cache fits `cache_limit_bytes`; returns the keys removed."""
        if not self.cache_limit_bytes:
            return []
        with self._lock:
            keep = keep | self._in_use
        sizes = {key: _dir_bytes(self.shards_dir / key) for key in self.shard_keys()}
        total = sum(sizes.values())
        removed = []
        for key in sorted(set(sizes) - keep, key=self._last_used):
            if total <= self.cache_limit_bytes:
                break
            shutil.rmtree(self.shards_dir / key, ignore_errors=True)
            total -= sizes[key]
            removed.append(key)
            log.info(
                "removed shard %s (%s, unused since %s): the shard cache is over its "
                "--cache-limit of %s",
                key[:12], _mib(sizes[key]), time.ctime(self._last_used(key)),
                _mib(self.cache_limit_bytes),
            )  # fmt: skip
        return removed

    def _last_used(self, shard_key: str) -> float:
        try:
            return (self.shards_dir / shard_key / MANIFEST).stat().st_mtime
        except OSError:
            return 0.0

    def prune(self, keep: set[str]) -> list[str]:
        """Delete every shard not in `keep`; returns the keys removed."""
        removed = [key for key in self.shard_keys() if key not in keep]
        for key in removed:
            shutil.rmtree(self.shards_dir / key)
            log.info("removed stale shard %s", key)
        return removed

    def _verified(self, shard_key: str, block: str, entry: dict[str, Any] | None) -> bool:
        path = self.block_path(shard_key, block)
        if entry is None or not path.is_file():
            return False
        if path.stat().st_size != entry.get("bytes"):
            log.warning(
                "block %s of shard %s has the wrong size; it must be fetched again",
                block,
                shard_key,
            )
            return False
        if sha256_file(path) != entry.get("sha256"):
            log.warning(
                "block %s of shard %s is corrupted; it must be fetched again", block, shard_key
            )
            return False
        return True

    def _read_manifest(self, shard_key: str) -> dict[str, Any]:
        path = self.shard_dir(shard_key) / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError:
            manifest = None
        except (OSError, ValueError) as e:
            log.warning("manifest %s is unreadable (%s); treating the shard as empty", path, e)
            manifest = None
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            return {"format": MANIFEST_FORMAT, "blocks": {}}
        if not isinstance(manifest.get("blocks"), dict):
            manifest["blocks"] = {}
        return manifest

    def _write_manifest(self, shard_key: str, manifest: dict[str, Any]) -> None:
        path = self.shard_dir(shard_key) / MANIFEST
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_path(path)
        try:
            tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
            _fsync(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync(path.parent)


def _dir_bytes(directory: Path) -> int:
    total = 0
    for path in directory.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file():
                total += path.stat().st_size
    return total


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f} MiB"


def sha256_file(path: Path) -> str:
    """sha256 hex of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    buf = bytearray(HASH_PIECE_BYTES)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def _safe_name(name: str, what: str) -> str:
    if not _SAFE_NAME.match(name) or ".." in name:
        raise ValueError(
            f"{what} {name!r} is not a safe file name: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return name


def _dtype_name(dtype: torch.dtype | str) -> str:
    name = str(dtype).removeprefix("torch.")
    _dtype(name)
    return name


def _dense_mode(dtype_name: str) -> str:
    """The weights mode of a shard whose matrices are stored in `dtype_name`."""
    return "bf16" if dtype_name == "bfloat16" else "fp32"


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"storage dtype {name!r} is not a torch dtype (e.g. bfloat16)")
    return dtype


def _temp_path(path: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def _remove_stale_temp_files(directory: Path) -> None:
    """Temporary files left by a killed writer (old enough that no live write owns them)."""
    now = time.time()
    for tmp in directory.glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            if now - tmp.stat().st_mtime > STALE_TEMP_S:
                tmp.unlink()


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's entries to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
