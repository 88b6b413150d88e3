"""Digests of checkpoint files' bytes, remembered by (path, size, mtime_ns).

`file_digests(paths, cache_file)` returns a blake2b hex digest of each file's whole
contents (header and tensor data), streaming it in large pieces (about 1 GB/s: half a
second for SmolLM2's 540 MB). The digests are kept in a small JSON file keyed by each
file's absolute path with its size and mtime_ns, so a restart does not rehash an
unchanged checkpoint; a file rewritten in place gets a new mtime (or size) and is
hashed again. The JSON is replaced atomically; an unreadable one is ignored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PIECE_BYTES = 8 << 20
MAX_ENTRIES = 256  # the oldest entries beyond this are forgotten


def file_digests(paths: Sequence[Path], cache_file: Path | None) -> list[str]:
    """blake2b hex digests of `paths`' contents, reusing `cache_file`'s entries."""
    cache = _read(cache_file) if cache_file is not None else {}
    digests, changed = [], False
    for path in paths:
        key = str(Path(path).resolve())
        stat = os.stat(key)
        entry = cache.get(key)
        if (
            entry
            and entry.get("size") == stat.st_size
            and entry.get("mtime_ns") == stat.st_mtime_ns
        ):
            digests.append(str(entry["digest"]))
            continue
        start = time.monotonic()
        digest = hash_file(Path(key))
        log.info("hashed %s (%.0f MB) in %.1f s", key, stat.st_size / 1e6, time.monotonic() - start)
        cache[key] = {
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "digest": digest,
            "at": time.time(),
        }
        digests.append(digest)
        changed = True
    if changed and cache_file is not None:
        _write(cache_file, cache)
    return digests


def hash_file(path: Path) -> str:
    """blake2b (32-byte) hex digest of a file, read in PIECE_BYTES pieces."""
    digest = hashlib.blake2b(digest_size=32)
    buf = bytearray(PIECE_BYTES)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def _read(cache_file: Path) -> dict[str, Any]:
    try:
        data = json.loads(cache_file.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable digest cache %s (%s)", cache_file, exc)
        return {}
    return data if isinstance(data, dict) else {}


def _write(cache_file: Path, cache: dict[str, Any]) -> None:
    newest = sorted(cache.items(), key=lambda kv: kv[1].get("at", 0), reverse=True)
    kept = dict(newest[:MAX_ENTRIES])
    tmp: str | None = None
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{cache_file.name}.", dir=cache_file.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(kept, f, indent=1, sort_keys=True)
        os.replace(tmp, cache_file)
    except OSError as exc:  # a read-only cache only costs a rehash next time
        log.warning("could not save the digest cache %s: %s", cache_file, exc)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
