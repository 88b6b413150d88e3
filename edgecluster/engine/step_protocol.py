"""What the hub tells agents at the start of each step, as one int64 tensor.

[op, n, payload...]: STEP carries n (seq_id, start_pos, num_tokens) rows and is
followed by the hidden state [T, H]; FREE carries n seq ids to drop from the KV
cache; END closes the session. Plain integers: nothing is evaluated.
"""

from __future__ import annotations

import torch

from edgecluster.errors import TensorMessageError

OP_STEP, OP_FREE, OP_END = 1, 2, 3
HUB = 0
AGENTS_CENTRE = 1  # the agents' star centre, which returns the last hidden state to the hub


def step_header(segments: list[tuple[int, int, int]]) -> torch.Tensor:
    flat = [v for row in segments for v in row]
    return torch.tensor([OP_STEP, len(segments), *flat], dtype=torch.int64)


def free_header(seq_ids: list[int]) -> torch.Tensor:
    return torch.tensor([OP_FREE, len(seq_ids), *seq_ids], dtype=torch.int64)


def end_header() -> torch.Tensor:
    return torch.tensor([OP_END, 0], dtype=torch.int64)


def parse_header(header: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(op, payload): payload is [n, 3] segments for STEP, [n] seq ids for FREE."""
    if header.dtype != torch.int64 or header.dim() != 1 or header.numel() < 2:
        raise TensorMessageError(
            f"step header must be int64 [2+], got {header.dtype} {header.shape}"
        )
    op, n = int(header[0]), int(header[1])
    width = {OP_STEP: 3, OP_FREE: 1, OP_END: 0}.get(op)
    if width is None or n < 0 or header.numel() != 2 + n * width:
        raise TensorMessageError(f"malformed step header: op {op}, n {n}, {header.numel()} values")
    payload = header[2:]
    if op == OP_STEP:
        payload = payload.view(n, 3)
        if n == 0 or bool((payload[:, 1] < 0).any()) or bool((payload[:, 2] <= 0).any()):
            raise TensorMessageError("step segments need start >= 0 and num_tokens >= 1")
    return op, payload
