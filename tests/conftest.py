"""Suite-wide settings: one model cache shared by every test and its child processes.

The default model's GGUF is converted once (about 15 s) into this cache and reused
by the parity, streaming and serving tests instead of touching the user's cache.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("EDGE_CACHE_DIR", str(Path(tempfile.gettempdir()) / "edgecluster-test-cache"))
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
