"""The Agent gRPC service: invitations, shard transfer, serving sessions, status.

A bad request (a malformed tensor chunk, a wrong digest, a shard that is not here)
gets INVALID_ARGUMENT or FAILED_PRECONDITION with what was wrong; the agent keeps
serving.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator

import grpc
import torch

from edgecluster.device.allocator import release_free_memory
from edgecluster.errors import TensorMessageError
from edgecluster.net.codec import TensorAssembler, TensorLimits
from edgecluster.net.convert import spec_from_pb
from edgecluster.net.pb import edgecluster_pb2 as pb
from edgecluster.net.pb import edgecluster_pb2_grpc as pb_grpc
from edgecluster.runtime.agent_session import AgentSessions, SessionRequest
from edgecluster.weights.shard_store import ShardStore

log = logging.getLogger(__name__)


class AgentService(pb_grpc.AgentServicer):
    def __init__(
        self,
        *,
        store: ShardStore,
        on_invite: Callable[[str], None],
        sessions: AgentSessions,
        status: Callable[[], pb.AgentStatus],
        limits: TensorLimits | None = None,
    ) -> None:
        self._store = store
        self._on_invite = on_invite
        self._sessions = sessions
        self._status = status
        self._limits = limits or TensorLimits()
        self._put_lock = threading.Lock()

    def Invite(self, request: pb.InviteRequest, context: grpc.ServicerContext) -> pb.Empty:
        if ":" not in request.coordinator_address:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "coordinator_address must be host:port")
        self._on_invite(request.coordinator_address)
        return pb.Empty()

    def PrepareShard(
        self, request: pb.PrepareShardRequest, context: grpc.ServicerContext
    ) -> pb.PrepareShardReply:
        try:
            spec = spec_from_pb(request.spec)
            self._store.write_meta(
                request.shard_key,
                request.model_config_json,
                spec,
                request.storage_dtype,
                request.weights,
            )
            missing = self._store.missing_blocks(request.shard_key, list(request.blocks))
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        log.info(
            "shard %s: %d of %d blocks to fetch",
            request.shard_key[:12],
            len(missing),
            len(request.blocks),
        )
        return pb.PrepareShardReply(missing_blocks=missing)

    def PutShard(
        self, request_iterator: Iterator[pb.ShardChunk], context: grpc.ServicerContext
    ) -> pb.PutShardReply:
        with self._put_lock:
            try:
                return self._receive_blocks(request_iterator)
            except (TensorMessageError, ValueError) as exc:
                log.warning("refused shard data: %s", exc)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            finally:
                release_free_memory()
        raise AssertionError("unreachable")

    def _receive_blocks(self, chunks: Iterator[pb.ShardChunk]) -> pb.PutShardReply:
        tensors: dict[str, torch.Tensor] = {}
        assembler = TensorAssembler(self._limits)
        received = stored = 0
        for msg in chunks:
            received += len(msg.chunk.data)
            if msg.HasField("chunk"):  # a chunk without dtype is refused, never skipped
                tensor = assembler.add(msg.chunk)
                if tensor is not None:
                    tensors[msg.chunk.name] = tensor
            if msg.block_end:
                if assembler.in_progress:
                    raise TensorMessageError(
                        f"block {msg.block} ended inside a tensor: {assembler.describe_pending()}"
                    )
                self._store.write_block(msg.shard_key, msg.block, tensors, msg.block_sha256)
                tensors, stored = {}, stored + 1
        if assembler.in_progress:
            pending = assembler.describe_pending()
            raise TensorMessageError(f"stream ended inside a tensor: {pending}")
        if tensors:
            raise TensorMessageError("stream ended before its block was complete (no block_end)")
        return pb.PutShardReply(bytes_received=received, blocks_stored=stored)

    def OpenSession(self, request: pb.SessionSpec, context: grpc.ServicerContext) -> pb.AgentStatus:
        try:
            self._sessions.open(SessionRequest.from_pb(request, self._sessions.token))
        except (ValueError, FileNotFoundError, KeyError) as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"cannot open session: {exc}")
        return self._status()

    def CloseSession(
        self, request: pb.CloseSessionRequest, context: grpc.ServicerContext
    ) -> pb.Empty:
        self._sessions.close(request.session_id)
        return pb.Empty()

    def Status(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.AgentStatus:
        return self._status()
