"""Per-sequence KV cache of one agent's KV heads, for every layer it computes.

The hub is authoritative on positions: a step writes its keys at the positions it
names, and attention reads [0, start_pos + num_tokens). Buffers grow by doubling.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> None:
        self._shape = (num_layers, num_kv_heads, head_dim)
        self._dtype = dtype
        self._seqs: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    def _ensure(self, seq_id: int, length: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        layers, heads, dim = self._shape
        entry = self._seqs.get(seq_id)
        capacity = entry[0][0].shape[1] if entry else 0
        if length <= capacity and entry is not None:
            return entry
        new_cap = max(64, capacity * 2, length)
        ks = [torch.zeros(heads, new_cap, dim, dtype=self._dtype) for _ in range(layers)]
        vs = [torch.zeros(heads, new_cap, dim, dtype=self._dtype) for _ in range(layers)]
        if entry is not None:
            for new, old in zip(ks + vs, entry[0] + entry[1], strict=True):
                new[:, :capacity].copy_(old)
        self._seqs[seq_id] = (ks, vs)
        return ks, vs

    def update(
        self, seq_id: int, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes k, v [heads, t, dim] at [start, start+t); returns keys, values [0, start+t)."""
        end = start + k.shape[1]
        ks, vs = self._ensure(seq_id, end)
        ks[layer][:, start:end].copy_(k)
        vs[layer][:, start:end].copy_(v)
        return ks[layer][:, :end], vs[layer][:, :end]

    def free(self, seq_id: int) -> None:
        self._seqs.pop(seq_id, None)

    def clear(self) -> None:
        self._seqs.clear()

    @property
    def num_sequences(self) -> int:
        return len(self._seqs)

    def bytes_used(self) -> int:
        return sum(
            sum(t.numel() * t.element_size() for t in ks + vs) for ks, vs in self._seqs.values()
        )
