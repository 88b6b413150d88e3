"""Raw sequential read rate of a file: O_DIRECT reads of 8 MiB into one aligned buffer.

    python benchmarks/direct_read.py FILE [--max-bytes N]

Run by `streaming.py` inside an emulated device (after the page cache is dropped),
so the figure is what that device's disk gives a reader doing large sequential
reads. Prints one JSON line: {"bytes": .., "seconds": .., "direct": bool}.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import time
from collections.abc import Sequence

PIECE_BYTES = 8 << 20


def read_file(path: str, max_bytes: int) -> tuple[int, float, bool]:
    """Bytes read, seconds taken, and whether the reads bypassed the page cache."""
    try:
        fd, direct = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0)), True
    except OSError:
        fd, direct = os.open(path, os.O_RDONLY), False
    buffer = mmap.mmap(-1, PIECE_BYTES)  # page-aligned, as O_DIRECT needs
    total = 0
    try:
        start = time.perf_counter()
        while total < max_bytes and (n := os.preadv(fd, [buffer], total)) > 0:
            total += n
        seconds = time.perf_counter() - start
    finally:
        os.close(fd)
    return total, seconds, direct


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file")
    parser.add_argument("--max-bytes", type=int, default=1 << 62)
    args = parser.parse_args(argv)
    total, seconds, direct = read_file(args.file, args.max_bytes)
    print(json.dumps({"bytes": total, "seconds": seconds, "direct": direct}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
