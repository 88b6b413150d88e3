"""Per-token decode attention time of one agent's KV cache, on SmolLM2 shapes.

    python benchmarks/kv_attention.py [--context N] [--tokens N] [--kv-dtype D]

Builds a ShardExecutor over random weights for every head of SmolLM2-135M (9 query
heads, 3 KV heads, head_dim 64, 30 layers: one agent holding the whole model),
prefills `--context` positions, then times `--tokens` decode steps of attention
alone (QKV projection, rotary, KV write, attention, output projection), every layer.
Prints microseconds per token per layer, median of the steps, and the KV bytes held.
One thread, timed in thread CPU time, so the figure holds up on a busy machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from edgecluster.engine.shard_executor import ShardExecutor
from edgecluster.model_config import ATTN, ModelConfig
from edgecluster.types import ShardSpec

SMOLLM2 = ModelConfig(
    model_type="llama",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
)


class _Weights:
    def __init__(self, cfg: ModelConfig) -> None:
        qkv_rows = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self._attn = {
            "input_norm": torch.ones(cfg.hidden_size),
            "qkv_weight": torch.randn(qkv_rows, cfg.hidden_size) * 0.02,
            "o_weight": torch.randn(cfg.hidden_size, cfg.num_heads * cfg.head_dim) * 0.02,
        }

    def acquire(self, layer: int, kind: str) -> dict[str, torch.Tensor]:
        assert kind == ATTN
        return self._attn

    def release(self, layer: int, kind: str) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=512, help="positions prefilled")
    parser.add_argument("--tokens", type=int, default=128, help="decode steps timed")
    parser.add_argument("--kv-dtype", default="", help="float32 or bfloat16 (default: compute)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = SMOLLM2
    spec = ShardSpec(
        q_head_start=0, q_head_end=9, kv_head_start=0, kv_head_end=3,
        mlp_col_start=0, mlp_col_end=0, holds_output_bias=True,
    )  # fmt: skip
    kwargs = {"kv_dtype": getattr(torch, args.kv_dtype)} if args.kv_dtype else {}
    executor = ShardExecutor(
        cfg, spec, _Weights(cfg), torch.float32, args.context + args.tokens + 1, **kwargs
    )
    with torch.inference_mode():
        h = torch.randn(args.context, cfg.hidden_size)
        step = executor.begin_step(torch.tensor([[1, 0, args.context]]))
        for layer in range(cfg.num_layers):
            executor.attention(layer, h, step)
        times = []
        x = torch.randn(1, cfg.hidden_size)
        for i in range(args.tokens):
            step = executor.begin_step(torch.tensor([[1, args.context + i, 1]]))
            start = time.thread_time()
            for layer in range(cfg.num_layers):
                executor.attention(layer, x, step)
            times.append(time.thread_time() - start)
    per_layer_us = statistics.median(times) / cfg.num_layers * 1e6
    print(
        f"context {args.context}+{args.tokens}: attention {per_layer_us:.1f} us per token "
        f"per layer (median of {args.tokens}); KV held {executor.kv.bytes_used() / 2**20:.1f} MiB"
    )


if __name__ == "__main__":
    main()
