"""A tiny random Llama checkpoint (no tokenizer: prompts are token ids) for fault tests.

Small enough that a coordinator with two local agents serves it within seconds; the
answers are meaningless but deterministic, which is all a fault test compares.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.random_llama import LlamaShape, make_random_llama

TINY = LlamaShape(
    name="tiny-fault-llama", hidden_size=64, intermediate_size=128, num_layers=2,
    num_heads=4, num_kv_heads=2, vocab_size=256, max_position_embeddings=256,
)  # fmt: skip


def tiny_model(directory: Path) -> Path:
    return make_random_llama(TINY, directory)
