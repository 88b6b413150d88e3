"""An agent's serving session: its shard loaded, its links open, its step loop running.

At most one session at a time; opening a new one closes the old. The shard is
loaded before `open` returns (so a missing or corrupt shard is reported to the
coordinator at once); the links are opened and the steps followed on a thread.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

from edgecluster.comm.communicator import Communicator, SessionConfig
from edgecluster.engine.agent_loop import run_agent_session
from edgecluster.engine.shard_executor import ShardExecutor, WeightSource
from edgecluster.errors import EdgeClusterError
from edgecluster.model_config import ATTN, MLP, block_name
from edgecluster.net.datachannel import DataListener
from edgecluster.net.pb import edgecluster_pb2 as pb
from edgecluster.weights.shard_store import ShardStore

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, kw_only=True)
class SessionRequest:
    comm: SessionConfig
    shard_key: str
    compute_dtype: str
    window_blocks: int
    max_context: int

    @classmethod
    def from_pb(cls, m: pb.SessionSpec) -> SessionRequest:
        if m.compute_dtype not in _DTYPES:
            raise ValueError(f"compute dtype {m.compute_dtype!r} not in {sorted(_DTYPES)}")
        if not m.shard_key:
            raise ValueError("a serving session needs a shard_key")
        return cls(
            comm=SessionConfig(
                session_id=m.session_id,
                session_key=m.session_key,
                rank=m.rank,
                endpoints=tuple(m.endpoints),
                algorithm=m.algorithm or "star",
                link_delay_ms=m.link_delay_ms,
            ),
            shard_key=m.shard_key,
            compute_dtype=m.compute_dtype,
            window_blocks=m.window_blocks,
            max_context=m.max_context or 2048,
        )


class ResidentWeights:
    """Every block of the shard in memory, loaded once."""

    def __init__(self, blocks: dict[tuple[int, str], dict[str, torch.Tensor]]) -> None:
        self._blocks = blocks

    def acquire(self, layer: int, kind: str) -> dict[str, torch.Tensor]:
        return self._blocks[(layer, kind)]

    def release(self, layer: int, kind: str) -> None:
        pass

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for b in self._blocks.values() for t in b.values())


class AgentSessions:
    def __init__(self, *, store: ShardStore, listener: DataListener, node_name: str) -> None:
        self._store = store
        self._listener = listener
        self._node_name = node_name
        self._lock = threading.Lock()
        self._current: tuple[SessionRequest, Communicator | None, threading.Thread] | None = None
        self._comm: Communicator | None = None
        self.weights: WeightSource | None = None
        self.weight_bytes = 0

    @property
    def session_id(self) -> str:
        return self._current[0].comm.session_id if self._current else ""

    def open(self, req: SessionRequest) -> None:
        self.close(None)
        executor = self._load(req)
        self._listener.expect(req.comm.session_id, req.comm.session_key, req.comm.link_delay_ms)
        thread = threading.Thread(
            target=self._serve, args=(req, executor), name="agent-session", daemon=True
        )
        with self._lock:
            self._current = (req, None, thread)
        thread.start()

    def _load(self, req: SessionRequest) -> ShardExecutor:
        meta = self._store.read_meta(req.shard_key)
        if meta is None:
            raise ValueError(f"shard {req.shard_key} is not on this agent; send it first")
        cfg, spec = meta.model_config, meta.spec
        dtype = _DTYPES[req.compute_dtype]
        blocks = {}
        for layer in range(cfg.num_layers):
            for kind in (ATTN, MLP):
                name = block_name(layer, kind)
                blocks[(layer, kind)] = self._store.load_block(req.shard_key, name, dtype)
        weights = ResidentWeights(blocks)
        self.weights, self.weight_bytes = weights, weights.weight_bytes
        log.info("loaded shard %s: %d blocks in memory", req.shard_key[:12], len(blocks))
        return ShardExecutor(cfg, spec, weights, dtype, req.max_context)

    def _serve(self, req: SessionRequest, executor: ShardExecutor) -> None:
        sid = req.comm.session_id
        try:
            comm = Communicator.connect(req.comm, self._listener)
        except EdgeClusterError as exc:
            log.warning("session %s: could not open links: %s", sid[:8], exc)
            return
        with self._lock:
            self._comm = comm
        try:
            steps = run_agent_session(comm, executor)
            log.info("session %s ended after %d steps", sid[:8], steps)
        except (EdgeClusterError, ValueError) as exc:
            log.warning("session %s ended: %s", sid[:8], exc)
        finally:
            comm.close()
            self._listener.forget(sid)
            with self._lock:
                if self._current and self._current[0].comm.session_id == sid:
                    self._current, self._comm = None, None

    def close(self, session_id: str | None) -> None:
        """Closes the current session (only if it is `session_id`, when given)."""
        with self._lock:
            current, comm = self._current, self._comm
            if current is None or (session_id and current[0].comm.session_id != session_id):
                return
            self._current, self._comm = None, None
        self._listener.forget(current[0].comm.session_id)
        if comm is not None:
            comm.close()
        current[2].join(timeout=5)
        self.weights, self.weight_bytes = None, 0
