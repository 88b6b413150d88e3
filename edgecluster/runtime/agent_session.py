"""An agent's session: its shard (or its training stages), its links, its loop running.

At most one session at a time; opening a new one closes the old. The shard is
loaded before `open` returns (so a missing or corrupt shard is reported to the
coordinator at once); the links are opened and the steps followed on a thread.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from edgecluster.comm.communicator import Communicator, SessionConfig
from edgecluster.device.allocator import release_free_memory
from edgecluster.engine.agent_loop import run_agent_session
from edgecluster.engine.kv_cache import kv_bytes_per_token
from edgecluster.engine.linear import block_weight_bytes, prepare_block
from edgecluster.engine.shard_executor import ShardExecutor, WeightSource
from edgecluster.errors import COORDINATOR_PEER, EdgeClusterError
from edgecluster.model_config import ATTN, MLP, block_name
from edgecluster.net.auth import derive_session_key
from edgecluster.net.datachannel import DataListener
from edgecluster.net.pb import edgecluster_pb2 as pb
from edgecluster.plan.streaming import choose_window
from edgecluster.train.executor import run_training_session
from edgecluster.train.spec import TrainingSpec
from edgecluster.types import AgentRuntime
from edgecluster.weights.shard_store import ShardStore
from edgecluster.weights.streaming_store import StreamingWeights

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, kw_only=True)
class SessionRequest:
    comm: SessionConfig
    shard_key: str
    compute_dtype: str
    window_blocks: int
    max_context: int
    kv_dtype: str = ""  # empty: the compute dtype
    kv_budget_tokens: int = 0  # KV positions reserved on this agent; 0: max_context
    peer_names: tuple[str, ...] = ()  # each rank's name, for logs (empty: unknown)
    training: TrainingSpec | None = None  # a training session (no shard: stages instead)

    @property
    def kv_tokens(self) -> int:
        return self.kv_budget_tokens or self.max_context

    @classmethod
    def from_pb(cls, m: pb.SessionSpec, token: str) -> SessionRequest:
        """The request `m` describes; its data-channel key is derived from `token`."""
        if m.compute_dtype not in _DTYPES:
            raise ValueError(f"compute dtype {m.compute_dtype!r} not in {sorted(_DTYPES)}")
        if m.kv_dtype and m.kv_dtype not in _DTYPES:
            raise ValueError(f"KV dtype {m.kv_dtype!r} not in {sorted(_DTYPES)}")
        if m.kv_budget_tokens < 0 or m.max_context < 0:
            raise ValueError(
                f"kv_budget_tokens ({m.kv_budget_tokens}) and max_context ({m.max_context}) "
                "must not be negative"
            )
        if m.kind not in ("", "serving", "training"):
            raise ValueError(f"session kind {m.kind!r} is unknown (serving, training)")
        training = TrainingSpec.from_json(m.training_json) if m.kind == "training" else None
        if training is None and not m.shard_key:
            raise ValueError("a serving session needs a shard_key")
        if training is not None and m.rank not in training.ranks:
            raise ValueError(f"rank {m.rank} holds no stage of the training plan")
        return cls(
            comm=SessionConfig(
                session_id=m.session_id,
                session_key=derive_session_key(token, m.session_id, m.key_salt),
                rank=m.rank,
                endpoints=tuple(m.endpoints),
                algorithm=m.algorithm or "star",
                link_delay_ms=m.link_delay_ms,
                link_delays_ms=tuple(m.link_delays_ms),
                link_bandwidths_mb_s=tuple(m.link_bandwidths_mb_s),
                encrypt=m.encrypt_data,
            ),
            shard_key=m.shard_key,
            compute_dtype=m.compute_dtype,
            window_blocks=m.window_blocks,
            max_context=m.max_context or 2048,
            kv_dtype=m.kv_dtype,
            kv_budget_tokens=m.kv_budget_tokens,
            peer_names=tuple(name[:64] for name in m.peer_names),
            training=training,
        )


class ResidentWeights:
    """Every block of the shard in memory, loaded and prepared once."""

    def __init__(self, blocks: dict[tuple[int, str], dict[str, Any]]) -> None:
        self._blocks = blocks

    def acquire(self, layer: int, kind: str) -> dict[str, Any]:
        return self._blocks[(layer, kind)]

    def release(self, layer: int, kind: str) -> None:
        pass

    @property
    def weight_bytes(self) -> int:
        return sum(block_weight_bytes(b) for b in self._blocks.values())


@dataclass(frozen=True, kw_only=True)
class MemoryPolicy:
    """How much of the agent's memory weights may take (0: no limit promised)."""

    limit_bytes: int = 0
    window_override: int = 0
    read_bytes_per_s: float = 200e6
    matmul_gflops: float = 10.0


class AgentSessions:
    def __init__(
        self,
        *,
        store: ShardStore,
        listener: DataListener,
        node_name: str,
        token: str,
        memory: MemoryPolicy | None = None,
    ) -> None:
        self.token = token  # session keys are derived from it, never received
        self._store = store
        self._listener = listener
        self._node_name = node_name
        self._memory = memory or MemoryPolicy()
        self._lock = threading.Lock()
        self._current: tuple[SessionRequest, Communicator | None, threading.Thread] | None = None
        self._comm: Communicator | None = None
        self.weights: WeightSource | None = None
        self.weight_bytes = 0
        self.resident_weight_bytes = 0

    @property
    def session_id(self) -> str:
        return self._current[0].comm.session_id if self._current else ""

    def open(self, req: SessionRequest) -> None:
        self.close(None)
        gc.collect()  # a session that ended on its own may still be freeing its shard
        release_free_memory()
        executor = self._load(req) if req.training is None else None
        self._listener.expect(
            req.comm.session_id, req.comm.session_key, req.comm.link_delay_ms, req.comm.encrypt
        )
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
        self._store.use(req.shard_key)  # older shards beyond --cache-limit go
        cfg, spec = meta.model_config, meta.spec
        dtype = _DTYPES[req.compute_dtype]
        order = [
            ((layer, kind), self._store.block_path(req.shard_key, block_name(layer, kind)))
            for layer in range(cfg.num_layers)
            for kind in (ATTN, MLP)
            if (spec.num_q_heads if kind == ATTN else spec.num_mlp_cols) > 0
        ]
        sizes = [path.stat().st_size for _, path in order]
        self.weight_bytes = sum(sizes)
        kv_dtype = _DTYPES[req.kv_dtype] if req.kv_dtype else dtype
        per_token = kv_bytes_per_token(
            cfg.num_layers, spec.num_kv_heads, cfg.head_dim, kv_dtype.itemsize
        )
        window = choose_agent_window(
            self._memory,
            sizes,
            expand=_expansion(meta.weights, dtype),
            fixed_bytes=_rss_bytes() + per_token * req.kv_tokens,
            plan_hint=req.window_blocks,
            agent=self._node_name,
        )
        weights: WeightSource
        if window >= len(order):
            blocks = {}
            for key, _ in order:
                stored = self._store.load_block(req.shard_key, block_name(*key))
                blocks[key] = prepare_block(stored, key[1], dtype, resident=True)
                del stored
                # A prepared block may be a copy (fp32 is kept transposed): give the
                # stored one's pages back now, or the heap keeps both (peak RSS 2.7x).
                release_free_memory()
            weights = ResidentWeights(blocks)
            self.resident_weight_bytes = weights.weight_bytes
            log.info("loaded shard %s: %d blocks in memory", req.shard_key[:12], len(blocks))
        else:
            stream = StreamingWeights(
                order, window, dtype, lambda t, kind: prepare_block(t, kind, dtype, resident=False)
            )
            weights, self.resident_weight_bytes = stream, stream.resident_bytes
            log.info(
                "shard %s streams from disk: window %d of %d blocks (%.0f MiB resident)",
                req.shard_key[:12], window, len(order), stream.resident_bytes / 2**20,
            )  # fmt: skip
        self.weights = weights
        return ShardExecutor(cfg, spec, weights, dtype, req.max_context, kv_dtype=kv_dtype)

    def runtime(self) -> AgentRuntime:
        weights = self.weights
        streaming = isinstance(weights, StreamingWeights)
        rate = weights.stats().read_bytes_per_s if isinstance(weights, StreamingWeights) else 0.0
        return AgentRuntime(
            session_id=self.session_id,
            streaming=streaming,
            window_blocks=weights.window if isinstance(weights, StreamingWeights) else 0,
            read_bytes_per_s=rate,
            weight_bytes=self.weight_bytes,
            resident_weight_bytes=self.resident_weight_bytes,
            rss_bytes=_rss_bytes(),
            peak_rss_bytes=peak_rss_bytes(),
        )

    def _connect(self, req: SessionRequest) -> Communicator:
        """The session's links, each peer named for the log: rank 0 is the coordinator,
        the other agents by the names the coordinator sent (else rank and address)."""
        cfg = req.comm
        names = [COORDINATOR_PEER]
        for rank, endpoint in enumerate(cfg.endpoints[1:], start=1):
            given = req.peer_names[rank] if rank < len(req.peer_names) else ""
            names.append(given or f"rank {rank} ({endpoint})")
        return Communicator.connect(cfg, self._listener, names)

    def _serve(self, req: SessionRequest, executor: ShardExecutor | None) -> None:
        sid = req.comm.session_id
        try:
            comm = self._connect(req)
        except EdgeClusterError as exc:
            log.warning("session %s: could not open links: %s", sid[:8], exc)
            return
        with self._lock:
            self._comm = comm
        try:
            if req.training is not None:
                steps = run_training_session(comm, req.training)
            else:
                assert executor is not None
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
                    self._release_weights()

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
        with self._lock:
            self._release_weights()

    def _release_weights(self) -> None:
        """Drops the shard from memory (the next session measures a clean process)."""
        if isinstance(self.weights, StreamingWeights):
            self.weights.close()
        self.weights, self.weight_bytes, self.resident_weight_bytes = None, 0, 0
        gc.collect()
        release_free_memory()


ACTIVATION_SLACK_BYTES = 64 << 20
_STORED_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _expansion(weights: str, compute: torch.dtype) -> float:
    """Bytes in memory per stored byte once a block is prepared: int8 and int4 blocks
    stay packed (1), dense ones are converted to the compute dtype (bf16 -> fp32: 2)."""
    stored = _STORED_DTYPES.get(weights)
    return compute.itemsize / stored.itemsize if stored is not None else 1.0


def choose_agent_window(
    memory: MemoryPolicy,
    sizes: Sequence[int],
    *,
    expand: float,
    fixed_bytes: int,
    plan_hint: int,
    agent: str,
) -> int:
    """Blocks to keep resident: all of them when they fit, else a streaming window.

    `sizes` are the block files' bytes, `expand` the compute/storage size ratio, and
    `fixed_bytes` what the process holds anyway (runtime, KV cache).
    """
    if memory.window_override:
        return memory.window_override
    if not memory.limit_bytes:
        return plan_hint or len(sizes)
    room = memory.limit_bytes - fixed_bytes - ACTIVATION_SLACK_BYTES
    if sum(sizes) * expand <= room:
        return len(sizes)
    converting = int(max(sizes) * expand) if expand != 1 else 0  # the block being used
    per_block_s = max(sizes) * expand / 4 / (memory.matmul_gflops * 1e9 / 2)
    slot = max(sizes)  # every slot can come to hold the largest block
    choice = choose_window(
        block_bytes=[slot] * len(sizes),
        room_bytes=room - converting,
        read_bytes_per_s=memory.read_bytes_per_s,
        compute_s_per_block=per_block_s,
        allreduce_s=0.0,
        agent=agent,
    )
    log.info("streaming window: %s", choice.reason)
    return choice.window_blocks


def _rss_bytes() -> int:
    return int(psutil.Process().memory_info().rss)


def peak_rss_bytes() -> int:
    """VmHWM: the most resident memory this process has held."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _rss_bytes()
