"""The hub's part of the model (rank 0, the coordinator): embedding, final norm, LM head.

One forward step of a packed batch: broadcast the step header and the embedded
hidden state; the agents run the layers (agent_loop: every agent keeps the residual,
the star all-reduce among the agents sums their partials), and the first agent sends
the last hidden state back. The hub waits out the layers without a message per
block, so its process (HTTP, detokenizing) never sits on the per-layer path, and
one agent alone runs its layers with no message at all.

A step is checked whole before its first byte is broadcast (token ids inside the
vocabulary, positions inside the context): a bad step raises StepInputError and the
links stay in step. Anything raised after the header went out leaves the agents
mid-step; the caller must reset the session.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from edgecluster.comm.communicator import Communicator
from edgecluster.engine.linear import DenseLinear, make_linear
from edgecluster.engine.shard_executor import rms_norm
from edgecluster.engine.step_protocol import (
    AGENTS_CENTRE,
    end_header,
    free_header,
    step_header,
)
from edgecluster.errors import TensorMessageError
from edgecluster.model_config import ModelConfig
from edgecluster.weights.quant import QUANTIZED_MODES, dequantize_matrix, quantize_matrix

# Test-only fault injection: a step holding this token id raises after its header was
# broadcast, the worst place for a failure (tests/test_step_faults.py).
FAULT_TOKEN_ENV = "EDGE_TEST_FAULT_TOKEN"


class StepInputError(ValueError):
    """A step the hub refuses before sending anything (the links stay usable)."""


class HubModel:
    def __init__(
        self,
        cfg: ModelConfig,
        tensors: dict[str, torch.Tensor],
        dtype: torch.dtype,
        *,
        max_context: int | None = None,
        weights: str = "fp32",
    ):
        self.cfg, self.dtype = cfg, dtype
        self.max_context = max_context or cfg.max_position_embeddings
        fault = os.environ.get(FAULT_TOKEN_ENV, "")
        self._fault_token = int(fault) if fault.isdigit() else None
        self.final_norm = tensors["final_norm"].to(dtype)  # [H]
        tied = tensors["lm_head"] is tensors["embed"]
        # The LM head reads the whole [V, H] matrix per token while the agents wait, so
        # it is stored like the layers (`weights`) and split by vocabulary rows into one
        # slice per core, each computed on its own thread: torch's threads do not split
        # a matrix-vector product, the slices read with every core's share of memory
        # bandwidth (SmolLM2 fp32 on 2 cores: 10.9 ms as one F.linear, 5.2 ms).
        # With int4 layers the head is int8: GGUF files keep it at 8 bits or more, and
        # SmolLM2's int4 head alone cost 7% of perplexity (its int4 layers cost none).
        head_mode = "int8" if weights == "int4" else weights
        parts = max(1, min(4, len(os.sched_getaffinity(0))))
        head = tensors["lm_head"]
        self._head_parts = [
            make_linear(quantize_matrix("w", rows, head_mode), "w", dtype=dtype)
            for rows in head.chunk(parts)
        ]
        self._pool = ThreadPoolExecutor(parts, thread_name_prefix="lm-head") if parts > 1 else None
        # The embedding is read a few rows per token. Tied to a dense head, its rows
        # are read from the head's slices (no second copy); tied to a quantized head, a
        # stored copy is dequantized row by row; untied, it is kept as loaded.
        self._chunk = -(-head.shape[0] // parts)
        self._embed_rows: torch.Tensor | None = None
        self._embed_stored: dict[str, torch.Tensor] = {}
        if not tied:
            self._embed_rows = tensors["embed"].to(dtype)
        elif head_mode in QUANTIZED_MODES:
            self._embed_stored = quantize_matrix("w", head, head_mode)
        self.weights = weights

    @property
    def weight_bytes(self) -> int:
        """Bytes the hub holds: the LM head as stored, the embedding, the final norm."""
        head = sum(part.weight_bytes for part in self._head_parts)
        embed = sum(t.numel() * t.element_size() for t in self._embed_stored.values())
        if self._embed_rows is not None:
            embed += self._embed_rows.numel() * self._embed_rows.element_size()
        return head + embed + self.final_norm.numel() * self.final_norm.element_size()

    @property
    def bytes_per_token(self) -> int:
        """Bytes one decode step reads on the hub (the LM head; a row of the rest)."""
        return sum(part.weight_bytes for part in self._head_parts)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[T] ids -> [T, H] in the compute dtype."""
        if self._embed_rows is not None:
            return F.embedding(token_ids, self._embed_rows)
        if self._embed_stored:
            stored = {name: t[token_ids] for name, t in self._embed_stored.items()}
            return dequantize_matrix(stored, "w").to(self.dtype)
        rows = torch.empty(token_ids.numel(), self.cfg.hidden_size, dtype=self.dtype)
        for i, part in enumerate(self._head_parts):
            start = i * self._chunk
            mine = ((token_ids >= start) & (token_ids < start + self._chunk)).nonzero()[:, 0]
            if mine.numel():
                assert isinstance(part, DenseLinear)
                rows[mine] = part.rows(token_ids[mine] - start)
        return rows

    @torch.inference_mode()
    def forward(
        self, comm: Communicator, token_ids: torch.Tensor, segments: list[tuple[int, int, int]]
    ) -> torch.Tensor:
        """Logits [num_segments, V] (float32) at the last token of each segment."""
        self.check_step(token_ids, segments)
        comm.begin_step()  # reads get deadlines, keepalives flow (see Communicator)
        comm.broadcast(step_header(segments))
        if self._fault_token is not None and bool((token_ids == self._fault_token).any()):
            raise RuntimeError(
                f"injected test fault: token {self._fault_token} ({FAULT_TOKEN_ENV})"
            )
        h = self.embed(token_ids)  # [T, H]
        comm.broadcast(h)
        # The agents carry the residual through the layers among themselves; the
        # first of them sends back the last hidden state.
        h = comm.recv_watching(AGENTS_CENTRE)
        if h.shape != (token_ids.numel(), self.cfg.hidden_size):
            raise TensorMessageError(
                f"the agents returned a hidden state {tuple(h.shape)} for "
                f"{token_ids.numel()} tokens x hidden {self.cfg.hidden_size}"
            )
        comm.end_step()
        last = torch.tensor(_last_rows(segments))
        x = rms_norm(h[last], self.final_norm, self.cfg.rms_norm_eps)
        return self._logits(x).float()

    def check_tokens(self, token_ids: list[int], start: int = 0, more: int = 0) -> None:
        """StepInputError unless every id is in the vocabulary and every position
        (through `more` positions after the tokens) is inside the context."""
        vocab = self.cfg.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise StepInputError(f"token id {bad} is outside the vocabulary (0..{vocab - 1})")
        end = start + len(token_ids) + more
        if start < 0 or end > self.max_context:
            raise StepInputError(
                f"positions {start}..{end - 1} exceed the context of {self.max_context} tokens"
            )

    def check_step(self, token_ids: torch.Tensor, segments: list[tuple[int, int, int]]) -> None:
        """The whole step, before anything is sent: shapes, ids and positions."""
        if token_ids.dim() != 1 or token_ids.dtype != torch.int64:
            raise StepInputError(
                f"token ids must be int64 [T], got {token_ids.dtype} {token_ids.shape}"
            )
        if not segments or sum(n for _, _, n in segments) != token_ids.numel():
            raise StepInputError(
                f"{len(segments)} segments do not cover the step's {token_ids.numel()} tokens"
            )
        offset = 0
        for _, start, count in segments:
            if count <= 0:
                raise StepInputError(f"a segment of {count} tokens")
            self.check_tokens(token_ids[offset : offset + count].tolist(), start)
            offset += count

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [S, H] -> [S, V]."""
        if self._pool is None:
            return self._head_parts[0](x)
        parts = self._pool.map(lambda head: head(x), self._head_parts)
        return torch.cat(list(parts), dim=-1)

    @staticmethod
    def free(comm: Communicator, seq_ids: list[int]) -> None:
        comm.broadcast(free_header(seq_ids))

    @staticmethod
    def end(comm: Communicator) -> None:
        comm.broadcast(end_header())


def _last_rows(segments: list[tuple[int, int, int]]) -> list[int]:
    rows, offset = [], 0
    for _, _, count in segments:
        offset += count
        rows.append(offset - 1)
    return rows
