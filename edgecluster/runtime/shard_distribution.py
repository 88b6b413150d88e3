"""Slice the checkpoint per agent and stream each agent its blocks, with checksums.

The coordinator never loads the whole checkpoint: blocks are sliced one at a time
from the memory-mapped safetensors files. An agent first says which blocks of its
shard it lacks (absent or failing their hash); only those travel, in 1 MiB chunks,
each block closed by the digest of its tensors.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from edgecluster.model_config import ATTN, MLP, ModelConfig, block_name
from edgecluster.net.codec import encode_chunks
from edgecluster.net.convert import spec_to_pb
from edgecluster.net.pb import edgecluster_pb2 as pb
from edgecluster.net.pb import edgecluster_pb2_grpc as pb_grpc
from edgecluster.plan.tensor_parallel import AgentPlacement
from edgecluster.weights.checkpoint import Checkpoint
from edgecluster.weights.slicing import slice_block, tensor_digest

log = logging.getLogger(__name__)

Progress = Callable[[int], None]  # bytes sent


def shard_key(model_id: str, placement: AgentPlacement, storage_dtype: str) -> str:
    spec = placement.spec
    text = "|".join(
        str(v)
        for v in (
            model_id,
            storage_dtype,
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


def _chunks(
    ckpt: Checkpoint,
    cfg: ModelConfig,
    placement: AgentPlacement,
    key: str,
    blocks: list[str],
    dtype: torch.dtype,
    progress: Progress,
) -> Iterator[pb.ShardChunk]:
    for name in blocks:
        layer, kind = int(name.split(".")[1]), name.split(".")[2]
        tensors = slice_block(ckpt, cfg, placement.spec, layer, kind, dtype)
        ckpt.close()  # unmap: the coordinator holds one block at a time, not the checkpoint
        for tname, tensor in tensors.items():
            for chunk in encode_chunks(tensor, tname):
                progress(len(chunk.data))
                yield pb.ShardChunk(shard_key=key, block=name, chunk=chunk)
        yield pb.ShardChunk(
            shard_key=key, block=name, block_end=True, block_sha256=tensor_digest(tensors)
        )


def send_shard(
    stub: pb_grpc.AgentStub,
    ckpt: Checkpoint,
    cfg: ModelConfig,
    placement: AgentPlacement,
    key: str,
    storage_dtype: str,
    progress: Progress,
) -> int:
    """Makes sure the agent holds its shard; returns the bytes sent (0: cache reused)."""
    blocks = all_blocks(cfg)
    reply = stub.PrepareShard(
        pb.PrepareShardRequest(
            shard_key=key,
            model_config_json=cfg.to_json(),
            spec=spec_to_pb(placement.spec),
            blocks=blocks,
            storage_dtype=storage_dtype,
        ),
        timeout=60,
    )
    missing = list(reply.missing_blocks)
    if not missing:
        log.info("%s already holds its shard (verified cache)", placement.name)
        return 0
    dtype = getattr(torch, storage_dtype)
    sent = stub.PutShard(_chunks(ckpt, cfg, placement, key, missing, dtype, progress))
    log.info(
        "%s: sent %d blocks, %.1f MiB",
        placement.name,
        sent.blocks_stored,
        sent.bytes_received / 2**20,
    )
    return int(sent.bytes_received)


def distribute(
    stubs: dict[str, pb_grpc.AgentStub],
    ckpt: Checkpoint,
    cfg: ModelConfig,
    placements: tuple[AgentPlacement, ...],
    keys: dict[str, str],
    storage_dtype: str,
    progress: Progress,
) -> dict[str, int]:
    """Sends every agent its shard in parallel; returns bytes sent per node id."""
    with ThreadPoolExecutor(max_workers=max(1, len(placements))) as pool:
        futures = {
            p.node_id: pool.submit(
                send_shard, stubs[p.node_id], ckpt, cfg, p, keys[p.node_id], storage_dtype, progress
            )
            for p in placements
        }
        results = {}
        for node_id, future in futures.items():
            try:
                results[node_id] = future.result()
            except grpc.RpcError as exc:
                name = next(p.name for p in placements if p.node_id == node_id)
                raise ShardTransferError(name, node_id, exc) from exc
        return results


class ShardTransferError(Exception):
    def __init__(self, name: str, node_id: str, exc: grpc.RpcError) -> None:
        code = exc.code() if hasattr(exc, "code") else "?"
        details = exc.details() if hasattr(exc, "details") else str(exc)
        super().__init__(f"sending the shard of agent {name} failed: {code}: {details}")
        self.node_id = node_id
