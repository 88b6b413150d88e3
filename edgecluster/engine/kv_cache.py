"""Per-sequence KV cache of one agent's KV heads, for every layer it computes.

The hub is authoritative on positions: a step writes its keys at the positions it
names, and attention reads [0, start_pos + num_tokens).

Memory follows the sequences actually held. Each sequence has, per layer, one
contiguous key and one value buffer [heads, capacity, head_dim] whose capacity is a
whole number of KV_BLOCK_TOKENS-position blocks: it grows by whole blocks when a
step writes past it (one layer at a time, so growing never holds two copies of the
whole cache) and is freed with the sequence. A sequence of n positions therefore
holds at most ceil(n / KV_BLOCK_TOKENS) blocks, which is what the scheduler's
admission counts (`kv_blocks_tokens`). Contiguous buffers keep decode attention one
matmul over a view, with no per-step gather of blocks.

The cache may store keys and values in a narrower dtype than compute (bfloat16 for
float32 compute halves its memory); attention then reads them converted.
"""

from __future__ import annotations

import torch

KV_BLOCK_TOKENS = 64  # positions per block: a sequence's buffers grow by whole blocks


def kv_blocks_tokens(positions: int) -> int:
    """Positions reserved for a sequence reaching `positions`: whole blocks."""
    return -(-max(positions, 0) // KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Bytes one position takes in the cache: keys and values of every layer."""
    return 2 * num_layers * num_kv_heads * head_dim * itemsize


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        *,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        self._shape = (num_layers, num_kv_heads, head_dim)
        self._dtype = dtype
        self._compute = compute_dtype or dtype
        # seq_id -> (keys per layer, values per layer); a layer's buffers are [h, cap, d]
        self._seqs: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def _layer_buffers(self, seq_id: int, layer: int, length: int) -> tuple[torch.Tensor, ...]:
        """This layer's buffers of `seq_id`, grown by whole blocks to hold `length`."""
        entry = self._seqs.get(seq_id)
        if entry is None:
            num_layers, heads, dim = self._shape
            empty = torch.empty(heads, 0, dim, dtype=self._dtype)
            entry = self._seqs[seq_id] = ([empty] * num_layers, [empty] * num_layers)
        keys, values = entry
        capacity = keys[layer].shape[1]
        if length > capacity:
            keys[layer] = _grown(keys[layer], kv_blocks_tokens(length))
            values[layer] = _grown(values[layer], kv_blocks_tokens(length))
        return keys[layer], values[layer]

    def update(
        self, seq_id: int, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes k, v [heads, t, dim] at [start, start+t); returns keys, values [0, start+t)
        in the compute dtype."""
        end = start + k.shape[1]
        keys, values = self._layer_buffers(seq_id, layer, end)
        keys[:, start:end].copy_(k)
        values[:, start:end].copy_(v)
        held_k, held_v = keys[:, :end], values[:, :end]
        if self._dtype != self._compute:
            return held_k.to(self._compute), held_v.to(self._compute)
        return held_k, held_v

    def free(self, seq_id: int) -> None:
        self._seqs.pop(seq_id, None)

    def clear(self) -> None:
        self._seqs.clear()

    @property
    def num_sequences(self) -> int:
        return len(self._seqs)

    def bytes_used(self) -> int:
        """Bytes of every buffer held (whole blocks)."""
        return sum(
            sum(t.numel() * t.element_size() for t in ks + vs) for ks, vs in self._seqs.values()
        )


def _grown(old: torch.Tensor, capacity: int) -> torch.Tensor:
    """A [h, capacity, d] buffer holding `old`'s positions first."""
    heads, held, dim = old.shape
    new = torch.empty(heads, capacity, dim, dtype=old.dtype)
    if held:
        new[:, :held].copy_(old)
    return new
