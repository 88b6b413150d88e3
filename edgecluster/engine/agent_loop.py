"""The agent's side of a serving session: follow the hub's steps until END.

Per step: receive the header and the embedded hidden state h from the hub, then for
each layer h += all-reduce(attention partial), h += all-reduce(MLP partial) among
the agents only (ranks 1..N, star centred on rank 1); every agent holds the same h
(one sum, broadcast). The last MLP is reduced to rank 1, which sends the final h to
the hub. One agent alone sends nothing per layer. Any error on the links ends the
session (PeerLostError).
"""

from __future__ import annotations

import logging

import torch

from edgecluster.comm.communicator import Communicator
from edgecluster.engine.shard_executor import ShardExecutor
from edgecluster.engine.step_protocol import (
    AGENTS_CENTRE,
    HUB,
    OP_END,
    OP_FREE,
    OP_STEP,
    parse_header,
)

log = logging.getLogger(__name__)


@torch.inference_mode()
def run_agent_session(comm: Communicator, executor: ShardExecutor) -> int:
    """Serves steps until the hub ends the session; returns the number of steps."""
    steps = 0
    layers = executor.cfg.num_layers
    agents = tuple(range(1, comm.world_size))
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
            h = h + comm.all_reduce(executor.attention(layer, h, step), agents)
            partial = executor.mlp(layer, h)
            if layer < layers - 1:
                h = h + comm.all_reduce(partial, agents)
            else:
                total = comm.reduce(partial, dst=AGENTS_CENTRE, ranks=agents)
                if total is not None:
                    comm.send(h + total, HUB)
        steps += 1


def _check_step(h: torch.Tensor, segments: torch.Tensor, executor: ShardExecutor) -> None:
    tokens = int(segments[:, 2].sum())
    if h.dim() != 2 or h.shape != (tokens, executor.cfg.hidden_size):
        raise ValueError(
            f"hidden state {tuple(h.shape)} does not match the step's {tokens} tokens "
            f"x hidden {executor.cfg.hidden_size}"
        )
