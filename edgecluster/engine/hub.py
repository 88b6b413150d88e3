"""The hub's part of the model (rank 0, the coordinator): embedding, final norm, LM head.

One forward step of a packed batch: broadcast the step header and the embedded
hidden state, then for every block all-reduce the residual (the hub's partial is the
residual itself, the agents' partials are their attention / MLP outputs). The last
block is a reduce to the hub only. Two messages per agent per block; nothing else
crosses the network.

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
from edgecluster.engine.shard_executor import rms_norm
from edgecluster.engine.step_protocol import end_header, free_header, step_header
from edgecluster.model_config import ModelConfig

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
    ):
        self.cfg, self.dtype = cfg, dtype
        self.max_context = max_context or cfg.max_position_embeddings
        fault = os.environ.get(FAULT_TOKEN_ENV, "")
        self._fault_token = int(fault) if fault.isdigit() else None
        self.embed = tensors["embed"].to(dtype)  # [V, H]
        self.final_norm = tensors["final_norm"].to(dtype)  # [H]
        head = tensors["lm_head"]
        self.lm_head = self.embed if head is tensors["embed"] else head.to(dtype)  # [V, H]
        # The LM head reads the whole [V, H] matrix per token while the agents wait:
        # one slice per core reads it with every core's share of memory bandwidth
        # (6.1 -> 3.4 ms for SmolLM2 on 2 cores; torch's own threads do not split a
        # matrix-vector product).
        parts = max(1, min(4, len(os.sched_getaffinity(0))))
        self._head_parts = self.lm_head.chunk(parts)
        self._pool = ThreadPoolExecutor(parts, thread_name_prefix="lm-head") if parts > 1 else None

    @property
    def weight_bytes(self) -> int:
        tensors = {id(t): t for t in (self.embed, self.final_norm, self.lm_head)}
        return sum(t.numel() * t.element_size() for t in tensors.values())

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
        h = F.embedding(token_ids, self.embed)  # [T, H]
        comm.broadcast(h)
        blocks = 2 * self.cfg.num_layers
        for block in range(blocks):
            if block < blocks - 1:
                h = comm.all_reduce(h)
            else:
                reduced = comm.reduce(h)
                assert reduced is not None
                h = reduced
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
            return F.linear(x, self.lm_head)
        parts = self._pool.map(lambda w: F.linear(x, w), self._head_parts)
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
