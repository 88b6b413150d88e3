"""Rotary position embeddings as Hugging Face Llama computes them (rotate-half form)."""

from __future__ import annotations

import math

import torch

from edgecluster.model_config import ModelConfig


def inverse_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """[head_dim/2] inverse frequencies, with llama3 or linear scaling when configured."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv / float(scaling["factor"])
    return _llama3(inv, scaling)


def _llama3(inv: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = (
        float(s["factor"]),
        float(s["low_freq_factor"]),
        float(s["high_freq_factor"]),
    )
    old_len = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryTable:
    """cos and signed sin for positions [0, max_positions), grown on demand.

    The signed sin has its first half negated, so rotate-half becomes a roll:
    rotate_half(x) * sin == roll(x, head_dim / 2) * signed_sin (the halves of sin are
    equal), one kernel instead of a slice, a negation and a concatenation.
    """

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, max_positions: int = 2048) -> None:
        self._inv = inverse_frequencies(cfg)
        self._dtype = dtype
        self._cos = self._sin = torch.empty(0)
        self._build(max_positions)

    def _build(self, n: int) -> None:
        freqs = torch.outer(torch.arange(n, dtype=torch.float32), self._inv)
        emb = torch.cat((freqs, freqs), dim=-1)  # [n, head_dim]
        signed = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)
        self._cos, self._sin = emb.cos().to(self._dtype), signed.to(self._dtype)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin of shape [T, 1, head_dim] for the given positions [T]."""
        needed = int(positions.max()) + 1 if positions.numel() else 0
        if needed > self._cos.shape[0]:
            self._build(max(needed, 2 * self._cos.shape[0]))
        return self._cos[positions, None], self._sin[positions, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos, signed_sin: [T, 1, head_dim] from RotaryTable."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)
