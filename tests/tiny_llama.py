"""A tiny random Llama checkpoint (no tokenizer: prompts are token ids) for real-process tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig


def make_tiny_llama(path: Path, max_positions: int = 4096) -> Path:
    """Writes a 2-layer, 64-wide random Llama to `path`; serving it takes milliseconds."""
    torch.manual_seed(11)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=max_positions,
        tie_word_embeddings=False, rope_theta=10000.0,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(path)
    return path
