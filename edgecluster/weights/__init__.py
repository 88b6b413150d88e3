"""Weights: checkpoint readers, the slicer that cuts agents' blocks, agents' shard files.

- `models`: resolve a model spec (bundled name, checkpoint dir, .gguf) to a checkpoint dir.
- `checkpoint`: lazy reads of a safetensors checkpoint (never loaded whole).
- `slicing`: an agent's blocks per the contract in `edgecluster.model_config`.
- `shard_store`: an agent's verified, crash-safe blocks on disk.
- `safetensors_file`: header parsing and the one-read block reader.

Imports nothing from net, engine or plan.
"""

from edgecluster.weights.checkpoint import Checkpoint
from edgecluster.weights.models import DEFAULT_MODEL, model_fingerprint, resolve_model
from edgecluster.weights.shard_store import ShardMeta, ShardStore, read_block_raw
from edgecluster.weights.slicing import (
    block_bytes,
    block_shapes,
    hub_tensors,
    slice_block,
    tensor_digest,
)

__all__ = [
    "DEFAULT_MODEL",
    "Checkpoint",
    "ShardMeta",
    "ShardStore",
    "block_bytes",
    "block_shapes",
    "hub_tensors",
    "model_fingerprint",
    "read_block_raw",
    "resolve_model",
    "slice_block",
    "tensor_digest",
]
