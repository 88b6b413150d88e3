"""Logging set-up for the CLIs: one line per record, the node's name in each."""

from __future__ import annotations

import logging
import sys


def configure_logging(node_name: str, level: str = "INFO") -> None:
    class _NodeName(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.node = node_name
            return True

    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_NodeName())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)-7s [%(node)s] %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("zeroconf", "aiohttp.access", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
