"""Slice the checkpoint per agent and stream each agent its blocks, with checksums.

The coordinator never loads the whole checkpoint: blocks are sliced one at a time
from the memory-mapped safetensors files. An agent first says which blocks of its
shard it lacks (absent or failing their hash); only those travel, in 1 MiB chunks,
each block closed by the digest of its tensors. Blocks travel in their stored form
(`weights` mode: int8 / int4 matrices stay packed on the wire). Every block is its own PutShard call
with a deadline scaled to its bytes, so a hung agent is found within seconds; agents
are served in parallel and every failure is reported (AgentCallsFailed).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

import grpc
import torch

from edgecluster.model_config import ATTN, MLP, ModelConfig, block_name
from edgecluster.net.codec import encode_chunks
from edgecluster.net.convert import spec_to_pb
from edgecluster.net.pb import edgecluster_pb2 as pb
from edgecluster.net.pb import edgecluster_pb2_grpc as pb_grpc
from edgecluster.plan.tensor_parallel import AgentPlacement
from edgecluster.runtime.agent_calls import (
    AgentCallError,
    call_all,
    prepare_deadline_s,
    put_deadline_s,
)
from edgecluster.weights.checkpoint import Checkpoint
from edgecluster.weights.slicing import slice_block, tensor_digest

log = logging.getLogger(__name__)

Progress = Callable[[int], None]  # bytes sent


def shard_key(model_id: str, placement: AgentPlacement, storage_dtype: str, weights: str) -> str:
    """The shard's identity: model, share, dense dtype and weights mode (a shard sliced
    for one mode is never served as another)."""
    spec = placement.spec
    text = "|".join(
        str(v)
        for v in (
            model_id,
            storage_dtype,
            weights,
            spec.q_head_start,
            spec.q_head_end,
            spec.kv_head_start,
            spec.kv_head_end,
            spec.mlp_col_start,
            spec.mlp_col_end,
            spec.holds_output_bias,
        )
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def all_blocks(cfg: ModelConfig) -> list[str]:
    return [block_name(layer, kind) for layer in range(cfg.num_layers) for kind in (ATTN, MLP)]


def _block_chunks(
    ckpt: Checkpoint,
    cfg: ModelConfig,
    placement: AgentPlacement,
    key: str,
    name: str,
    dtype: torch.dtype,
    weights: str | None,
) -> list[pb.ShardChunk]:
    """One block's chunks, closed by its digest (one block in memory at a time)."""
    layer, kind = int(name.split(".")[1]), name.split(".")[2]
    tensors = slice_block(ckpt, cfg, placement.spec, layer, kind, dtype, weights=weights)
    ckpt.close()  # unmap: the coordinator holds one block at a time, not the checkpoint
    chunks = [
        pb.ShardChunk(shard_key=key, block=name, chunk=chunk)
        for tname, tensor in tensors.items()
        for chunk in encode_chunks(tensor, tname)
    ]
    chunks.append(
        pb.ShardChunk(
            shard_key=key, block=name, block_end=True, block_sha256=tensor_digest(tensors)
        )
    )
    return chunks


def send_shard(
    stub: pb_grpc.AgentStub,
    ckpt: Checkpoint,
    cfg: ModelConfig,
    placement: AgentPlacement,
    key: str,
    storage_dtype: str,
    progress: Progress,
    weights: str = "",
) -> int:
    """Makes sure the agent holds its shard; returns the bytes sent (0: cache reused).
    Its matrices are stored in `weights` (empty: dense in `storage_dtype`).

    Raises AgentCallError naming the agent and the call that failed or missed its deadline.
    """
    blocks = all_blocks(cfg)
    request = pb.PrepareShardRequest(
        shard_key=key,
        model_config_json=cfg.to_json(),
        spec=spec_to_pb(placement.spec),
        blocks=blocks,
        storage_dtype=storage_dtype,
        weights=weights,
    )
    try:
        reply = stub.PrepareShard(request, timeout=prepare_deadline_s(placement.weight_bytes))
    except grpc.RpcError as exc:
        raise AgentCallError(placement.name, placement.node_id, "PrepareShard", exc) from exc
    missing = list(reply.missing_blocks)
    if not missing:
        log.info("%s already holds its shard (verified cache)", placement.name)
        return 0
    dtype = getattr(torch, storage_dtype)
    sent = 0
    for name in missing:
        chunks = _block_chunks(ckpt, cfg, placement, key, name, dtype, weights or None)
        nbytes = sum(len(c.chunk.data) for c in chunks)
        try:
            reply_put = stub.PutShard(iter(chunks), timeout=put_deadline_s(nbytes))
        except grpc.RpcError as exc:
            call = f"PutShard of block {name}"
            raise AgentCallError(placement.name, placement.node_id, call, exc) from exc
        sent += int(reply_put.bytes_received)
        progress(nbytes)
    log.info("%s: sent %d blocks, %.1f MiB", placement.name, len(missing), sent / 2**20)
    return sent


def distribute(
    stubs: dict[str, pb_grpc.AgentStub],
    ckpt: Checkpoint,
    cfg: ModelConfig,
    placements: tuple[AgentPlacement, ...],
    keys: dict[str, str],
    storage_dtype: str,
    progress: Progress,
    weights: str = "",
) -> dict[str, int]:
    """Sends every agent its shard in parallel; returns bytes sent per node id.

    Raises AgentCallsFailed naming every agent whose transfer failed.
    """
    calls = {
        p.node_id: (
            lambda p=p: send_shard(
                stubs[p.node_id], ckpt, cfg, p, keys[p.node_id], storage_dtype, progress, weights
            )
        )
        for p in placements
    }
    return call_all(calls, {p.node_id: p.name for p in placements}, "shard transfer")
