"""FLOP and byte counts of pipeline training for any Llama-shaped ModelConfig.

Pure arithmetic, no torch. Counts are per micro-batch of `micro_batch_size` sequences
of `seq_len` tokens, fp32 throughout (training keeps fp32 master weights here):

- a decoder layer's forward is 2 FLOPs per parameter per token plus causal attention
  (QK^T and AV over half the context on average); backward costs BACKWARD_FACTOR
  times the forward (gradients of inputs and of weights);
- stage 0's work for one micro-batch is the embedding lookup (tiny) at the start and
  the final norm, LM head and cross-entropy, forward and backward, at the end;
- between stages travels one hidden state [B, T, hidden] forward and its gradient of
  the same size backward;
- memory per parameter is TRAINING_BYTES_PER_PARAM (weights, gradients, AdamW's two
  moments), and each micro-batch an agent holds keeps what backward needs: an
  estimate of a layer's saved tensors (norm inputs and outputs, q/k/v, attention
  probabilities, MLP gate/up/product) or of the logits and their softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgecluster.model_config import ModelConfig

FP32_BYTES = 4
BACKWARD_FACTOR = 2.0
TRAINING_BYTES_PER_PARAM = 4 * FP32_BYTES  # weight, gradient, AdamW exp_avg and exp_avg_sq


@dataclass(frozen=True, kw_only=True)
class PipelineCosts:
    """What the stage allocator and the simulator need to know of the model."""

    num_layers: int
    layer_forward_flops: float  # one decoder layer, one micro-batch
    embed_forward_flops: float  # embedding lookup, one micro-batch
    head_forward_flops: float  # final norm + LM head + loss, one micro-batch
    activation_bytes: int  # hidden state (or its gradient) sent between stages
    layer_param_bytes: int  # one layer's weights, gradients and optimizer state
    stage0_param_bytes: int  # embedding, final norm, LM head: same accounting
    layer_saved_bytes: int  # what one layer keeps for backward, one micro-batch
    head_saved_bytes: int  # what stage 0 keeps for backward, one micro-batch
    layer_params: int
    stage0_params: int

    def stage_forward_flops(self, num_layers: int) -> float:
        return num_layers * self.layer_forward_flops

    def stage_backward_flops(self, num_layers: int) -> float:
        return BACKWARD_FACTOR * self.stage_forward_flops(num_layers)

    @property
    def loss_flops(self) -> float:
        """Stage 0's end-of-path job: head forward, loss, head backward."""
        return (1.0 + BACKWARD_FACTOR) * self.head_forward_flops


def pipeline_costs(model: ModelConfig, *, micro_batch_size: int, seq_len: int) -> PipelineCosts:
    """Counts for `model` trained on micro-batches of `micro_batch_size` x `seq_len` tokens."""
    if micro_batch_size < 1 or seq_len < 1:
        raise ValueError(
            f"micro_batch_size ({micro_batch_size}) and seq_len ({seq_len}) must be >= 1"
        )
    h, inter, vocab = model.hidden_size, model.intermediate_size, model.vocab_size
    tokens = micro_batch_size * seq_len
    layer_params = model.layer_params + 2 * h  # plus the two RMSNorm weights
    heads_dim = model.num_heads * model.head_dim
    attention_flops = 2 * seq_len * heads_dim  # 4 * T/2 * H*hd per token, causal
    head_matrices = 1 if model.tie_word_embeddings else 2
    stage0_params = head_matrices * vocab * h + h
    kv_dim = model.num_kv_heads * model.head_dim
    layer_saved_per_token = FP32_BYTES * (
        6 * h + heads_dim + 2 * kv_dim + 4 * inter + model.num_heads * seq_len
    )
    return PipelineCosts(
        num_layers=model.num_layers,
        layer_forward_flops=float(tokens * (2 * model.layer_params + attention_flops)),
        embed_forward_flops=float(tokens * h),
        head_forward_flops=float(tokens * (2 * vocab * h + 5 * vocab + 4 * h)),
        activation_bytes=FP32_BYTES * tokens * h,
        layer_param_bytes=TRAINING_BYTES_PER_PARAM * layer_params,
        stage0_param_bytes=TRAINING_BYTES_PER_PARAM * stage0_params,
        layer_saved_bytes=tokens * layer_saved_per_token,
        head_saved_bytes=FP32_BYTES * tokens * (2 * vocab + 2 * h),
        layer_params=layer_params,
        stage0_params=stage0_params,
    )
