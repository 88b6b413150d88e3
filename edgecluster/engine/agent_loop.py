"""The agent's side of a serving session: follow the hub's steps until END.

Per step: receive the header and the hidden state, then for each layer compute the
attention partial, all-reduce, compute the MLP partial, all-reduce (the last one a
reduce to the hub). Any error on the links ends the session (PeerLostError).
"""

from __future__ import annotations

import logging

import torch

from edgecluster.comm.communicator import Communicator
from edgecluster.engine.shard_executor import ShardExecutor
from edgecluster.engine.step_protocol import OP_END, OP_FREE, OP_STEP, parse_header

log = logging.getLogger(__name__)


@torch.inference_mode()
def run_agent_session(comm: Communicator, executor: ShardExecutor) -> int:
    """Serves steps until the hub ends the session; returns the number of steps."""
    steps = 0
    layers = executor.cfg.num_layers
    while True:
        comm.end_step()  # between steps the hub may idle: no deadline, no keepalives
        op, payload = parse_header(comm.broadcast(None, src=0))
        if op == OP_END:
            return steps
        if op == OP_FREE:
            for seq_id in payload.tolist():
                executor.kv.free(seq_id)
            continue
        assert op == OP_STEP
        comm.begin_step()  # until the next header, the hub expects us within the deadline
        h = comm.broadcast(None, src=0).to(executor.dtype)
        _check_step(h, payload, executor)
        step = executor.begin_step(payload)
        for layer in range(layers):
            h = comm.all_reduce(executor.attention(layer, h, step))
            partial = executor.mlp(layer, h)
            if layer < layers - 1:
                h = comm.all_reduce(partial)
            else:
                comm.reduce(partial)
        steps += 1


def _check_step(h: torch.Tensor, segments: torch.Tensor, executor: ShardExecutor) -> None:
    tokens = int(segments[:, 2].sum())
    if h.dim() != 2 or h.shape != (tokens, executor.cfg.hidden_size):
        raise ValueError(
            f"hidden state {tuple(h.shape)} does not match the step's {tokens} tokens "
            f"x hidden {executor.cfg.hidden_size}"
        )
